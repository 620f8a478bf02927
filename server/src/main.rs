use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use ulm_model::bundle::ModelBundle;
use ulm_model::demo::{save_demo_checkpoint, DEFAULT_SEED};
use ulm_model::sampling::SamplingParams;
use ulm_server::oneshot;
use ulm_server::serve::{serve, ServeArgs};
use ulm_server::train::{train, TrainArgs};

/// Serves and trains the ULM-R1 (Janus-Pro) unified multimodal model.
#[derive(Parser)]
#[command(name = "ulm-server", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// Checkpoint directory (Janus-Pro / ULM-R1 layout). Absent: the built-in demo model.
    #[arg(long, env = "ULM_MODEL")]
    model: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "ULM_DEVICE", default_value = "cpu")]
    device: String,
    /// f32, bf16 or f16.
    #[arg(long, env = "ULM_DTYPE", default_value = "f32")]
    dtype: String,
}

impl ModelArgs {
    fn open(&self) -> Result<ModelBundle> {
        let bundle = ModelBundle::open_named(self.model.as_deref(), &self.device, &self.dtype)?;
        eprintln!("model: {}", bundle.describe());
        Ok(bundle)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP server.
    Serve(Box<ServeArgs>),
    /// Print the OpenAPI document.
    Openapi,
    /// Offline GRPO over a JSONL dataset.
    Train(Box<TrainArgs>),
    /// Answer a question about an image.
    Answer {
        #[command(flatten)]
        model: ModelArgs,
        /// PNG, JPEG or WebP file.
        #[arg(long)]
        image: PathBuf,
        #[arg(long)]
        question: String,
        /// Number of answers to sample.
        #[arg(long, default_value_t = 1)]
        n: usize,
        #[arg(long, default_value_t = 256)]
        max_new_tokens: usize,
        /// 0 decodes greedily.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long)]
        top_p: Option<f32>,
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Generate images from a text prompt into PNG files.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 1)]
        n: usize,
        #[arg(long, default_value_t = 5.0)]
        cfg_weight: f32,
        #[arg(long, default_value_t = 1.0)]
        temperature: f32,
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Directory for image-<i>.png.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Write the built-in demo model as a checkpoint directory.
    SaveDemo {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = DEFAULT_SEED)]
        seed: u64,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve(args) => {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(serve(*args))?;
        }
        Command::Openapi => println!("{}", ulm_server::api::openapi_json()),
        Command::Train(args) => train(*args)?,
        Command::Answer {
            model,
            image,
            question,
            n,
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            seed,
        } => {
            let bundle = model.open()?;
            let args = oneshot::AnswerArgs {
                image: &image,
                question: &question,
                n,
                max_new_tokens,
                sampling: SamplingParams {
                    temperature,
                    top_k,
                    top_p,
                },
                seed,
            };
            for (i, text) in oneshot::answer(&bundle, &args)?.iter().enumerate() {
                println!("[{i}] {text}");
            }
        }
        Command::Generate {
            model,
            prompt,
            n,
            cfg_weight,
            temperature,
            top_k,
            seed,
            out,
        } => {
            let bundle = model.open()?;
            let args = oneshot::GenerateArgs {
                prompt: &prompt,
                n,
                cfg_weight,
                sampling: SamplingParams {
                    temperature,
                    top_k,
                    top_p: None,
                },
                seed,
                out_dir: &out,
            };
            for path in oneshot::generate(&bundle, &args)? {
                println!("{}", path.display());
            }
        }
        Command::SaveDemo { out, seed } => {
            save_demo_checkpoint(&out, seed)?;
            println!("{}", out.display());
        }
    }
    Ok(())
}
