//! Datasets in Parquet, as Hugging Face stores CoRL data: the same columns as
//! JSONL, with images as the `{bytes, path}` struct or as plain binary.

use std::path::Path;
use std::sync::Arc;

use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use ulm_rl::dataset::{read_dataset, read_jsonl};
use ulm_rl::reward::verifiable::QaType;

fn png() -> Vec<u8> {
    let img =
        image::RgbImage::from_fn(20, 12, |x, y| image::Rgb([(x * 9) as u8, (y * 7) as u8, 3]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// One optional byte-array column: a value per row (None = null) and its
/// definition level when present.
struct Column {
    values: Vec<Option<Vec<u8>>>,
    /// Definition level of a row whose value is null (the parent group may be present).
    null_level: Vec<i16>,
    present_level: i16,
}

fn text(values: &[Option<&str>]) -> Column {
    Column {
        values: values
            .iter()
            .map(|v| v.map(|s| s.as_bytes().to_vec()))
            .collect(),
        null_level: vec![0; values.len()],
        present_level: 1,
    }
}

fn write(path: &Path, schema: &str, columns: Vec<Column>) {
    let schema = Arc::new(parse_message_type(schema).unwrap());
    let file = std::fs::File::create(path).unwrap();
    let props = Arc::new(WriterProperties::builder().build());
    let mut writer = SerializedFileWriter::new(file, schema, props).unwrap();
    let mut group = writer.next_row_group().unwrap();
    let mut columns = columns.into_iter();
    while let Some(mut col) = group.next_column().unwrap() {
        let c = columns.next().expect("a column per leaf");
        let values: Vec<ByteArray> = c
            .values
            .iter()
            .flatten()
            .map(|v| ByteArray::from(v.clone()))
            .collect();
        let levels: Vec<i16> = c
            .values
            .iter()
            .zip(&c.null_level)
            .map(|(v, &null)| if v.is_some() { c.present_level } else { null })
            .collect();
        col.typed::<ByteArrayType>()
            .write_batch(&values, Some(&levels), None)
            .unwrap();
        col.close().unwrap();
    }
    group.close().unwrap();
    writer.close().unwrap();
}

#[test]
fn parquet_with_hugging_face_image_structs() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("corl.parquet");
    let image = png();
    write(
        &path,
        "message schema {
            optional binary caption (UTF8);
            optional group image { optional binary bytes; optional binary path (UTF8); }
            optional binary qa_problem (UTF8);
            optional binary qa_solution (UTF8);
            optional binary qa_type (UTF8);
        }",
        vec![
            text(&[Some("a red square"), Some("a blue circle")]),
            // Row 1 has image bytes (levels: image 1, bytes 2); row 2 no image.
            Column {
                values: vec![Some(image.clone()), None],
                null_level: vec![1, 0],
                present_level: 2,
            },
            Column {
                values: vec![Some(b"q1.png".to_vec()), None],
                null_level: vec![1, 0],
                present_level: 2,
            },
            text(&[Some("What colour?\nA. red\nB. blue"), None]),
            text(&[Some("<answer>A</answer>"), None]),
            text(&[Some("MC"), None]),
        ],
    );
    let items = read_dataset(&path).unwrap();
    assert_eq!(items.len(), 2);
    let qa = items[0].qa.as_ref().unwrap();
    assert_eq!(items[0].caption.as_deref(), Some("a red square"));
    assert_eq!((qa.image.width(), qa.image.height()), (20, 12));
    assert_eq!(qa.solution, "<answer>A</answer>");
    assert_eq!(qa.qa_type, QaType::MultipleChoice);
    assert!(items[1].qa.is_none());
    assert_eq!(items[1].caption.as_deref(), Some("a blue circle"));
}

#[test]
fn parquet_with_binary_images_and_aliases_and_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let schema = "message schema {
        optional binary prompt (UTF8);
        optional binary image;
        optional binary question (UTF8);
        optional binary answer (UTF8);
        optional binary qa_type (UTF8);
    }";
    let good = tmp.path().join("good.parquet");
    let binary = |v: Vec<Option<Vec<u8>>>| Column {
        null_level: vec![0; v.len()],
        values: v,
        present_level: 1,
    };
    write(
        &good,
        schema,
        vec![
            text(&[None]),
            binary(vec![Some(png())]),
            text(&[Some("What is it?")]),
            text(&[Some("a gradient")]),
            text(&[Some("OE")]),
        ],
    );
    let items = read_dataset(&good).unwrap();
    assert_eq!(items[0].qa.as_ref().unwrap().qa_type, QaType::OpenEnded);
    assert!(items[0].caption.is_none());

    let bad = tmp.path().join("bad.parquet");
    write(
        &bad,
        schema,
        vec![
            text(&[Some("fine"), Some("x")]),
            binary(vec![None, Some(b"not an image".to_vec())]),
            text(&[None, Some("q")]),
            text(&[None, Some("a")]),
            text(&[None, Some("OE")]),
        ],
    );
    let err = read_dataset(&bad).unwrap_err().to_string();
    assert!(err.contains("bad.parquet:2"), "{err}");

    let not_parquet = tmp.path().join("x.parquet");
    std::fs::write(&not_parquet, "{}").unwrap();
    assert!(read_dataset(&not_parquet).is_err());
    // Other extensions are JSONL.
    let jsonl = tmp.path().join("x.jsonl");
    std::fs::write(&jsonl, r#"{"caption": "c"}"#).unwrap();
    assert_eq!(
        read_dataset(&jsonl).unwrap().len(),
        read_jsonl(&jsonl).unwrap().len()
    );
}
