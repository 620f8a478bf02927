//! The world model's tokenizer: byte-level BPE like the demo's, so any text
//! still encodes, with merges learned from the world's prompts, questions
//! and answers. The world's words become single tokens, which shortens a
//! training sequence about threefold and makes a colour one prediction
//! instead of several.

use candle_core::Result;
use serde_json::json;
use tokenizers::models::bpe::BpeTrainerBuilder;
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};
use ulm_model::demo::{demo_tokenizer_json, SPECIAL_TOKENS};
use ulm_world::{examples, Split};

use crate::PretrainError;

/// The language model's vocabulary: room for every token of the world's
/// tokenizer (about 440: the bytes, the merges the world's text has, and
/// the Janus special tokens, which take the last ids).
pub const WORLD_VOCAB: usize = 512;

/// Training examples whose text the merges are learned from.
const CORPUS_EXAMPLES: usize = 3000;

/// The text of the world's chat turns, as the processor lays them out
/// around its special tokens.
fn corpus(world_seed: u64) -> Vec<String> {
    let mut texts = vec![": ".to_string(), "\n\n".to_string(), ":".to_string()];
    for example in examples(world_seed, Split::Train).take(CORPUS_EXAMPLES) {
        for caption in &example.captions {
            texts.push(format!(": {}\n\n", caption.text));
        }
        for question in &example.questions {
            texts.push(format!("\n{}\n\n", question.text));
            texts.push(question.answer.clone());
        }
    }
    texts
}

/// Learns the world's tokenizer; the same seed gives the same tokenizer.
pub fn world_tokenizer(world_seed: u64) -> std::result::Result<Tokenizer, PretrainError> {
    let fail = |e: tokenizers::Error| PretrainError::Invalid(format!("world tokenizer: {e}"));
    let mut bytes_only = demo_tokenizer_json();
    bytes_only["added_tokens"] = json!([]);
    let mut tokenizer = Tokenizer::from_bytes(bytes_only.to_string()).map_err(fail)?;
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(WORLD_VOCAB - SPECIAL_TOKENS.len())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .show_progress(false)
        .build()
        .into();
    tokenizer
        .train(&mut trainer, corpus(world_seed).into_iter())
        .map_err(fail)?;
    let special: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|token| AddedToken::from(*token, true))
        .collect();
    tokenizer.add_special_tokens(special).map_err(fail)?;
    let size = tokenizer.get_vocab_size(true);
    if size > WORLD_VOCAB {
        return Err(PretrainError::Invalid(format!(
            "world tokenizer: {size} tokens, more than {WORLD_VOCAB}"
        )));
    }
    Ok(tokenizer)
}

/// Ids of the tokens the language config names: BOS, EOS, padding.
pub fn config_ids(tokenizer: &Tokenizer) -> Result<[u32; 3]> {
    let id = |token: &str| {
        tokenizer
            .token_to_id(token)
            .ok_or_else(|| candle_core::Error::Msg(format!("no {token} token")))
    };
    Ok([
        id(SPECIAL_TOKENS[0])?,
        id(SPECIAL_TOKENS[1])?,
        id(SPECIAL_TOKENS[2])?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn world_words_are_single_tokens_and_any_text_still_encodes() {
        let tokenizer = world_tokenizer(0).unwrap();
        assert!(tokenizer.get_vocab_size(true) <= WORLD_VOCAB);
        let ids = |text: &str| tokenizer.encode(text, false).unwrap().get_ids().to_vec();
        for word in [
            " red",
            " circle",
            " triangle",
            " purple",
            " square",
            " above",
        ] {
            assert_eq!(ids(word).len(), 1, "{word:?}");
        }
        let odd = "Zebra 🦓 über";
        let back = tokenizer.decode(&ids(odd), true).unwrap();
        assert_eq!(back, odd);
        let sentence = "a photo of a red circle above a blue square";
        assert!(
            ids(sentence).len() * 3 <= sentence.len(),
            "{:?}",
            ids(sentence)
        );
        let specials_first = tokenizer.get_vocab_size(true) - SPECIAL_TOKENS.len();
        assert_eq!(config_ids(&tokenizer).unwrap()[0] as usize, specials_first);
        let again = world_tokenizer(0).unwrap();
        assert_eq!(
            tokenizer.to_string(false).unwrap(),
            again.to_string(false).unwrap()
        );
    }
}
