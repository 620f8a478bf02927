//! Drawing a scene at any image side, with hard edges: every pixel is the
//! background or exactly one object's colour.

use image::{Rgb, RgbImage};

use crate::scene::{Object, Scene, Shape, BACKGROUND};

/// The scene as a `side` x `side` RGB image.
pub fn render(scene: &Scene, side: u32) -> RgbImage {
    let mut image = RgbImage::from_pixel(side, side, Rgb(BACKGROUND));
    for object in &scene.objects {
        draw(&mut image, object);
    }
    image
}

fn draw(image: &mut RgbImage, object: &Object) {
    let side = image.width() as f32;
    let [cx, cy] = object.centre().map(|c| c * side);
    let half = object.size.half_extent() * side;
    let colour = Rgb(object.colour.rgb());
    let lo = |c: f32| (c - half).floor().max(0.0) as u32;
    let side_px = image.width();
    let hi = |c: f32| ((c + half).ceil() as u32).min(side_px);
    for y in lo(cy)..hi(cy) {
        for x in lo(cx)..hi(cx) {
            // Pixel centres decide, so shapes are symmetric at any side.
            let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            if inside(object.shape, dx, dy, half) {
                image.put_pixel(x, y, colour);
            }
        }
    }
}

/// Whether offset (dx, dy) from the centre lies in the shape of half extent
/// `half`. The triangle points up, its base as wide as it is tall.
fn inside(shape: Shape, dx: f32, dy: f32, half: f32) -> bool {
    match shape {
        Shape::Circle => dx * dx + dy * dy <= half * half,
        Shape::Square => dx.abs() <= half && dy.abs() <= half,
        Shape::Triangle => dy.abs() <= half && dx.abs() <= (dy + half) / 2.0,
    }
}
