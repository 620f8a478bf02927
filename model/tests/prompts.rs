//! User text never becomes control or image tokens, whatever it spells: the
//! template's tokens are placed by the processor alone.

use std::collections::HashSet;
use std::path::Path;

use tokenizers::{AddedToken, Tokenizer};
use ulm_model::processor::Processor;

/// Every added token of `tokenizer`: ids and texts.
fn added(tokenizer: &Tokenizer) -> (HashSet<u32>, Vec<String>) {
    let decoder = tokenizer.get_added_tokens_decoder();
    let ids = decoder.keys().copied().collect();
    let texts = decoder.into_values().map(|t| t.content).collect();
    (ids, texts)
}

/// The reference checkpoint's tokenizer and the demo's.
fn tokenizers() -> Vec<Tokenizer> {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/janus/tiny-a");
    vec![
        Tokenizer::from_file(fixture.join("tokenizer.json")).unwrap(),
        ulm_model::demo::demo_tokenizer().unwrap(),
    ]
}

#[test]
fn user_text_spelling_added_tokens_stays_plain_text() {
    for tokenizer in tokenizers() {
        let (ids, texts) = added(&tokenizer);
        assert!(texts.len() >= 10, "the tokenizer has its added tokens");
        let processor = Processor::new(tokenizer, true, 16).unwrap();
        let count = |prompt: &[u32]| prompt.iter().filter(|id| ids.contains(id)).count();
        let hostile = format!("What is here? {}", texts.join(" and "));

        let benign = processor.understanding_prompt("What is here?").unwrap();
        let attacked = processor.understanding_prompt(&hostile).unwrap();
        assert_eq!(count(&attacked.ids), count(&benign.ids));
        assert_eq!(attacked.image_span(), benign.image_span());

        let benign = processor.generation_prompt("a red circle").unwrap();
        let attacked = processor
            .generation_prompt(&format!("a red circle {}", texts.join("")))
            .unwrap();
        assert_eq!(count(&attacked.cond_ids), count(&benign.cond_ids));
        assert_eq!(attacked.cond_ids.last(), benign.cond_ids.last());

        for text in &texts {
            let plain = processor.encode_plain(text).unwrap();
            assert!(
                !plain.is_empty() && plain.iter().all(|id| !ids.contains(id)),
                "{text}"
            );
        }
    }
}

#[test]
fn non_special_added_tokens_are_broken_too() {
    for mut tokenizer in tokenizers() {
        tokenizer
            .add_tokens([AddedToken::from("<secret>", false)])
            .unwrap();
        let (ids, _) = added(&tokenizer);
        let processor = Processor::new(tokenizer, true, 16).unwrap();
        let plain = processor
            .encode_plain("a <secret> and <secret><|User|>")
            .unwrap();
        assert!(plain.iter().all(|id| !ids.contains(id)), "{plain:?}");
        let decoded = processor.decode(&plain);
        assert_eq!(decoded, "a <secret> and <secret><|User|>");
    }
}

#[test]
fn streamed_text_adds_up_to_the_decoded_answer() {
    for tokenizer in tokenizers() {
        let processor = Processor::new(tokenizer, true, 16).unwrap();
        let text = "Hé said: «naïve» 你好, then 🎉 twice 🎉 and <|User|> too.";
        let ids = processor.encode_plain(text).unwrap();
        let mut stream = ulm_model::processor::TextStream::default();
        let deltas: Vec<String> = ids.iter().map(|&id| stream.push(&processor, id)).collect();
        assert_eq!(deltas.concat(), processor.decode(&ids));
        // No delta carries half a character.
        assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')), "{deltas:?}");
    }
}
