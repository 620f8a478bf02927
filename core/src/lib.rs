//! The server's core, below HTTP: the engine (the model on its own thread,
//! fed by a bounded queue), the store (samples, feedback, jobs, versions),
//! the recording of served samples, the model registry, and the RL
//! scheduler. It depends on the model and RL crates and knows nothing of
//! HTTP: the API maps its typed errors to statuses.

pub mod engine;
pub mod jobs;
pub mod record;
pub mod registry;
pub mod scheduler;
pub mod store;

/// Declares an enum stored in the database by its snake_case name:
/// `as_str` gives the name, `FromStr` reads it back.
macro_rules! stored_enum {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, strum::EnumString, strum::IntoStaticStr)]
        #[strum(serialize_all = "snake_case")]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                self.into()
            }
        }
    };
}
pub(crate) use stored_enum;
