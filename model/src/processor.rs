//! Prompts for both tasks, as the reference `VLChatProcessor` builds them:
//! the "deepseek" SFT template, BOS prepended, each `<image_placeholder>`
//! expanded to `<begin_of_image>`, N placeholders, `<end_of_image>`; and for
//! generation the template plus `<begin_of_image>` with its CFG twin.

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

#[derive(Debug, Clone)]
pub struct Processor {
    tokenizer: Tokenizer,
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
        Ok(Self {
            tokenizer,
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

    /// The "deepseek" SFT template for one user turn and an open assistant turn.
    pub fn sft_format(&self, user_content: &str) -> String {
        let mut text = String::new();
        if !self.system_prompt.is_empty() {
            text.push_str(&self.system_prompt);
            text.push_str("\n\n");
        }
        text.push_str(USER);
        text.push_str(": ");
        text.push_str(user_content.trim());
        text.push_str("\n\n");
        text.push_str(ASSISTANT);
        text.push(':');
        text
    }

    /// Ids of `text`, BOS first when the tokenizer settings ask for it.
    /// Added tokens in the text (`<|User|>`, ...) are recognised as such.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if self.add_bos {
            ids.push(self.special.bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// A question about one image.
    pub fn understanding_prompt(&self, question: &str) -> Result<UnderstandingPrompt, ModelError> {
        let content = format!("{IMAGE}\n{question}");
        self.understanding_prompt_from_content(&content)
    }

    /// A user turn whose text carries `<image_placeholder>` tags, one per image.
    pub fn understanding_prompt_from_content(
        &self,
        content: &str,
    ) -> Result<UnderstandingPrompt, ModelError> {
        let raw = self.encode(&self.sft_format(content))?;
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

    /// A text-to-image prompt: template + `<begin_of_image>`; the unconditional
    /// twin keeps the first and last ids and pads everything between.
    pub fn generation_prompt(&self, prompt: &str) -> Result<GenerationPrompt, ModelError> {
        let text = format!("{}{BEGIN_IMAGE}", self.sft_format(prompt));
        let cond_ids = self.encode(&text)?;
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
