use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use ulm_model::demo::{save_demo_checkpoint, save_random_checkpoint, DEFAULT_SEED};
use ulm_server::corl::{corl, markdown, CorlArgs};
use ulm_server::gate_check::{self, gate_check, GateCheckArgs};
use ulm_server::oneshot::{self, AnswerArgs, GenerateArgs};
use ulm_server::pretrain::{eval, pretrain, EvalArgs, PretrainArgs};
use ulm_server::serve::{serve, Role, ServeArgs};
use ulm_server::train::{train, TrainArgs};
use ulm_server::world::{verify_caption, write_world, VerifyArgs, WorldArgs};

/// Serves and trains the ULM-R1 (Janus-Pro) unified multimodal model.
#[derive(Parser)]
#[command(name = "ulm-server", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP server.
    Serve(Box<ServeArgs>),
    /// Run RL jobs only, claimed from the shared database, beside serving
    /// replicas started with `--no-rl-scheduler` (same options as `serve`;
    /// HTTP answers /healthz, /readyz and /metrics).
    Worker(Box<ServeArgs>),
    /// Print the OpenAPI document.
    Openapi,
    /// Offline GRPO over a JSONL dataset.
    Train(Box<TrainArgs>),
    /// Answer a question about an image.
    Answer(Box<AnswerArgs>),
    /// Generate images from a text prompt into PNG files.
    Generate(Box<GenerateArgs>),
    /// Write the built-in demo model (or random weights of `--config`) as a checkpoint directory.
    SaveDemo {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = DEFAULT_SEED)]
        seed: u64,
        /// A `config.json` in the original layout: random weights of that
        /// architecture instead of the demo's (the demo tokenizer, so
        /// vocabulary and special token ids as in the demo's config).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Pretrain the architecture from scratch on the synthetic world.
    Pretrain(Box<PretrainArgs>),
    /// Accuracy of a model on the synthetic world's test split, per category and question type.
    Eval(Box<EvalArgs>),
    /// GRPO arms (unified, one task each, verifier-rewarded) from one model,
    /// several seeds each, evaluated on the world's test split: the CoRL comparison.
    Corl(Box<CorlArgs>),
    /// How often the evaluation gate's verdict on LoRA candidates matches
    /// fresh samples of them, on the world's test split.
    GateCheck(Box<GateCheckArgs>),
    /// Write examples of the synthetic world of coloured shapes as a dataset.
    World(WorldArgs),
    /// Read an image with the world's verifier and check a caption against it.
    Verify(VerifyArgs),
}

fn main() -> Result<()> {
    ulm_model::runtime::configure();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve(args) => {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(serve(*args, Role::Serve))?;
        }
        Command::Worker(args) => {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(serve(*args, Role::Worker))?;
        }
        Command::Openapi => println!("{}", ulm_server::api::openapi_json()),
        Command::Train(args) => println!("{}", train(*args)?.display()),
        Command::Answer(args) => {
            for (i, text) in oneshot::answer(&args)?.iter().enumerate() {
                println!("[{i}] {text}");
            }
        }
        Command::Generate(args) => {
            for path in oneshot::generate(&args)? {
                println!("{}", path.display());
            }
        }
        Command::SaveDemo { out, seed, config } => {
            match config {
                Some(path) => {
                    let config = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
                    save_random_checkpoint(&out, config, seed)?;
                }
                None => save_demo_checkpoint(&out, seed)?,
            }
            println!("{}", out.display());
        }
        Command::Pretrain(args) => {
            let summary = pretrain(&args)?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
        }
        Command::Eval(args) => print!("{}", eval(&args)?.table()),
        Command::Corl(args) => print!("{}", markdown(&corl(&args)?)),
        Command::GateCheck(args) => print!("{}", gate_check::markdown(&gate_check(&args)?)),
        Command::World(args) => {
            let lines = write_world(&args)?;
            println!("{} ({lines} items)", args.out.join("data.jsonl").display());
        }
        Command::Verify(args) => {
            println!("{:#}", verify_caption(&args)?);
        }
    }
    Ok(())
}
