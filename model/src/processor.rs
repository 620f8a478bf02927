//! Prompts for both tasks, as the reference `VLChatProcessor` builds them:
//! the "deepseek" SFT template, BOS prepended, each `<image_placeholder>`
//! expanded to `<begin_of_image>`, N placeholders, `<end_of_image>`; and for
//! generation the template plus `<begin_of_image>` with its CFG twin.
//!
//! A prompt is built from pieces: the template's tokens, placed by id, and
//! text. Text, the user's included, is always tokenized as plain text:
//! whatever it spells (`<|Assistant|>`, `<image_placeholder>`, any added
//! token), it never becomes a control or image token. For ordinary text this
//! gives the ids the reference gets by tokenizing the whole template string,
//! because the tokenizer encodes the text between added tokens on its own.

use std::path::Path;

use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::ModelError;

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

const BOS: &str = "<｜begin▁of▁sentence｜>";
const EOS: &str = "<｜end▁of▁sentence｜>";
const PAD: &str = "<｜▁pad▁｜>";
const IMAGE: &str = "<image_placeholder>";
const BEGIN_IMAGE: &str = "<begin_of_image>";
const END_IMAGE: &str = "<end_of_image>";
const USER: &str = "<|User|>";
const ASSISTANT: &str = "<|Assistant|>";

/// Ids of the tokens the templates use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: u32,
    pub eos: u32,
    pub pad: u32,
    pub image: u32,
    pub begin_image: u32,
    pub end_image: u32,
}

/// An understanding prompt: ids and which positions take image features.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnderstandingPrompt {
    pub ids: Vec<u32>,
    pub images_seq_mask: Vec<bool>,
}

impl UnderstandingPrompt {
    /// Index of the first image-feature position and the number of them.
    pub fn image_span(&self) -> Option<(usize, usize)> {
        let start = self.images_seq_mask.iter().position(|&m| m)?;
        let len = self.images_seq_mask[start..]
            .iter()
            .take_while(|&&m| m)
            .count();
        Some((start, len))
    }
}

/// A text-to-image prompt and its unconditional twin for CFG.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationPrompt {
    pub cond_ids: Vec<u32>,
    pub uncond_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct TokenizerSettings {
    #[serde(default = "default_true")]
    add_bos_token: bool,
}

fn default_true() -> bool {
    true
}

/// A piece of a chat prompt.
#[derive(Debug, Clone)]
enum Piece {
    /// A token the template places.
    Token(&'static str),
    /// Text, tokenized as plain text.
    Text(String),
}

#[derive(Debug, Clone)]
pub struct Processor {
    tokenizer: Tokenizer,
    /// The same tokenizer with special-token matching off: for text.
    plain: Tokenizer,
    /// Every added token (special or not), by id.
    added: std::collections::HashMap<u32, String>,
    pub special: SpecialTokens,
    add_bos: bool,
    /// Image-feature positions per image (the ViT's patch count).
    pub num_image_tokens: usize,
    /// Empty by default, as in ULM-R1 training; the plain Janus default
    /// system prompt can be set here.
    pub system_prompt: String,
}

impl Processor {
    pub fn new(
        tokenizer: Tokenizer,
        add_bos: bool,
        num_image_tokens: usize,
    ) -> Result<Self, ModelError> {
        let id = |tok: &str| {
            tokenizer
                .token_to_id(tok)
                .ok_or_else(|| ModelError::Tokenizer(format!("the tokenizer has no {tok} token")))
        };
        let special = SpecialTokens {
            bos: id(BOS)?,
            eos: id(EOS)?,
            pad: id(PAD)?,
            image: id(IMAGE)?,
            begin_image: id(BEGIN_IMAGE)?,
            end_image: id(END_IMAGE)?,
        };
        id(USER)?;
        id(ASSISTANT)?;
        let mut plain = tokenizer.clone();
        plain.set_encode_special_tokens(true);
        let added = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, token)| (id, token.content))
            .collect();
        Ok(Self {
            tokenizer,
            plain,
            added,
            special,
            add_bos,
            num_image_tokens,
            system_prompt: String::new(),
        })
    }

    /// Reads `tokenizer.json` and `tokenizer_config.json` (optional) of a checkpoint.
    pub fn from_dir(dir: &Path, num_image_tokens: usize) -> Result<Self, ModelError> {
        let path = dir.join(TOKENIZER_FILE);
        let tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        let settings_path = dir.join(TOKENIZER_CONFIG_FILE);
        let add_bos = match std::fs::read_to_string(&settings_path) {
            Ok(text) => {
                serde_json::from_str::<TokenizerSettings>(&text)
                    .map_err(|e| {
                        ModelError::Tokenizer(format!("{}: {e}", settings_path.display()))
                    })?
                    .add_bos_token
            }
            Err(_) => true,
        };
        Self::new(tokenizer, add_bos, num_image_tokens)
    }

    /// The "deepseek" SFT template around one user turn, with an open
    /// assistant turn.
    fn chat_turn(&self, user: Vec<Piece>) -> Vec<Piece> {
        let mut pieces = Vec::with_capacity(user.len() + 6);
        if !self.system_prompt.is_empty() {
            pieces.push(Piece::Text(format!("{}\n\n", self.system_prompt)));
        }
        pieces.push(Piece::Token(USER));
        pieces.push(Piece::Text(": ".into()));
        pieces.extend(user);
        pieces.push(Piece::Text("\n\n".into()));
        pieces.push(Piece::Token(ASSISTANT));
        pieces.push(Piece::Text(":".into()));
        pieces
    }

    /// The question's turn: the image, then the question.
    fn question_turn(&self, question: &str) -> Vec<Piece> {
        self.chat_turn(vec![
            Piece::Token(IMAGE),
            Piece::Text(format!("\n{}", question.trim_end())),
        ])
    }

    /// The text of the understanding template around `question`, as the
    /// reference writes it (`sft_format`).
    pub fn sft_format(&self, question: &str) -> String {
        self.question_turn(question)
            .into_iter()
            .map(|piece| match piece {
                Piece::Token(token) => token.to_string(),
                Piece::Text(text) => text,
            })
            .collect()
    }

    /// Ids of a prompt, BOS first when the tokenizer settings ask for it.
    fn encode(&self, pieces: Vec<Piece>) -> Result<Vec<u32>, ModelError> {
        let mut ids = Vec::new();
        if self.add_bos {
            ids.push(self.special.bos);
        }
        let mut text = String::new();
        for piece in pieces {
            match piece {
                Piece::Text(t) => text.push_str(&t),
                Piece::Token(token) => {
                    ids.extend(self.encode_plain(&std::mem::take(&mut text))?);
                    ids.push(self.tokenizer.token_to_id(token).ok_or_else(|| {
                        ModelError::Tokenizer(format!("the tokenizer has no {token} token"))
                    })?);
                }
            }
        }
        ids.extend(self.encode_plain(&text)?);
        Ok(ids)
    }

    /// Ids of `text` as plain text: no id of an added token. Special tokens
    /// are not matched; where a non-special added token still matches, every
    /// occurrence of an added token's text is cut after its first character
    /// and the parts are encoded apart.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let ids = self.plain_ids(text)?;
        if !ids.iter().any(|id| self.added.contains_key(id)) {
            return Ok(ids);
        }
        let mut cuts: Vec<usize> = self
            .added
            .values()
            .filter(|token| !token.is_empty())
            .flat_map(|token| {
                let first = token.chars().next().map_or(1, char::len_utf8);
                text.match_indices(token.as_str())
                    .map(move |(at, _)| at + first)
            })
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut ids = Vec::new();
        let mut start = 0;
        for cut in cuts.into_iter().chain([text.len()]) {
            ids.extend(self.plain_ids(&text[start..cut])?);
            start = cut;
        }
        if ids.iter().any(|id| self.added.contains_key(id)) {
            return Err(ModelError::InvalidInput(
                "the text cannot be tokenized without control tokens".into(),
            ));
        }
        Ok(ids)
    }

    fn plain_ids(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let encoding = self
            .plain
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// A question about one image.
    pub fn understanding_prompt(&self, question: &str) -> Result<UnderstandingPrompt, ModelError> {
        let raw = self.encode(self.question_turn(question))?;
        let s = self.special;
        let mut ids = Vec::with_capacity(raw.len() + self.num_image_tokens + 2);
        let mut images_seq_mask = Vec::with_capacity(ids.capacity());
        for id in raw {
            if id == s.image {
                ids.push(s.begin_image);
                images_seq_mask.push(false);
                ids.extend(std::iter::repeat_n(s.image, self.num_image_tokens));
                images_seq_mask.extend(std::iter::repeat_n(true, self.num_image_tokens));
                ids.push(s.end_image);
                images_seq_mask.push(false);
            } else {
                ids.push(id);
                images_seq_mask.push(false);
            }
        }
        Ok(UnderstandingPrompt {
            ids,
            images_seq_mask,
        })
    }

    /// A text-only turn: the chat template around `text`, no image.
    pub fn text_prompt(&self, text: &str) -> Result<UnderstandingPrompt, ModelError> {
        let ids = self.encode(self.chat_turn(vec![Piece::Text(text.trim().to_string())]))?;
        let images_seq_mask = vec![false; ids.len()];
        Ok(UnderstandingPrompt {
            ids,
            images_seq_mask,
        })
    }

    /// A text-to-image prompt: template + `<begin_of_image>`; the unconditional
    /// twin keeps the first and last ids and pads everything between.
    pub fn generation_prompt(&self, prompt: &str) -> Result<GenerationPrompt, ModelError> {
        let mut pieces = self.chat_turn(vec![Piece::Text(prompt.trim().to_string())]);
        pieces.push(Piece::Token(BEGIN_IMAGE));
        let cond_ids = self.encode(pieces)?;
        let last = cond_ids.len().saturating_sub(1);
        let uncond_ids = cond_ids
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                if i == 0 || i == last {
                    id
                } else {
                    self.special.pad
                }
            })
            .collect();
        Ok(GenerationPrompt {
            cond_ids,
            uncond_ids,
        })
    }

    /// Text of generated ids, special tokens removed. Ids the tokenizer does
    /// not know (the LM vocabulary can be larger) are skipped.
    /// Text of token ids. A decoded NUL (byte-level tokens can produce one)
    /// becomes U+FFFD: text holds no NUL, which PostgreSQL cannot store and
    /// most clients mishandle; the token ids keep the exact output.
    pub fn decode(&self, ids: &[u32]) -> String {
        let vocab = self.tokenizer.get_vocab_size(true) as u32;
        let known: Vec<u32> = ids.iter().copied().filter(|&id| id < vocab).collect();
        let text = self.tokenizer.decode(&known, true).unwrap_or_default();
        if text.contains('\0') {
            text.replace('\0', "\u{FFFD}")
        } else {
            text
        }
    }
}

/// The text of a growing answer, token by token. Each token decodes only a
/// short window (the tokens since the last emitted text, and the ones
/// before them for context), as text-generation-inference does, instead of
/// the whole answer.
#[derive(Debug, Clone, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    /// Start of the context window.
    prefix: usize,
    /// End of the text already emitted.
    read: usize,
}

impl TextStream {
    /// Adds a token; returns the text it completes (empty while a
    /// multi-byte character is incomplete).
    pub fn push(&mut self, processor: &Processor, token: u32) -> String {
        self.ids.push(token);
        let before = processor.decode(&self.ids[self.prefix..self.read]);
        let now = processor.decode(&self.ids[self.prefix..]);
        match now.strip_prefix(before.as_str()) {
            Some(delta) if !delta.is_empty() && !delta.ends_with('\u{FFFD}') => {
                let delta = delta.to_string();
                self.prefix = self.read;
                self.read = self.ids.len();
                delta
            }
            _ => String::new(),
        }
    }
}
