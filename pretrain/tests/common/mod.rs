//! Helpers shared by the pretraining tests.

use candle_core::backprop::GradStore;
use candle_core::Var;

/// Every parameter has a finite, non-zero gradient in `grads`.
pub fn assert_every_gradient(grads: &GradStore, params: &[(String, Var)]) {
    for (name, var) in params {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm.is_finite() && norm > 0.0, "{name}: |g|^2 = {norm}");
    }
}
