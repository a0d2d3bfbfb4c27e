//! `kiln`: the command line. Each subcommand's arguments and body live in `commands/`; this file
//! holds the list of subcommands, logging, and the dispatch.

mod commands;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kiln", version, about = "Train small language models end to end, and account for the energy they cost.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train from a recipe.
    Run(commands::run::Args),
    /// Start the coordinator (burn-collective's global orchestrator) for data-parallel runs.
    Coordinator {
        /// HOST:PORT to listen on; workers pass the same to --coordinator.
        #[arg(long)]
        listen: String,
    },
    /// Continue a stopped run from its newest checkpoint.
    Resume(commands::resume::Args),
    /// Recipe tools.
    Recipe {
        #[command(subcommand)]
        command: commands::recipe::Args,
    },
    /// Generate text from a run (its final/ model, else its newest checkpoint), a model folder, or hf://org/model.
    Generate(commands::generate::Args),
    /// Chat with a run, a model folder, a .gguf file or hf://org/model: multi-turn on a
    /// terminal, or one reply with --prompt.
    Chat(commands::chat::Args),
    /// Data tools: preview what training will see.
    Data {
        #[command(subcommand)]
        command: commands::data::Args,
    },
    /// Evaluate a run (its final/ model, else its newest checkpoint), a model folder, or hf://org/model.
    Eval(commands::eval::Args),
    /// Compare runs: a Markdown table and an SVG of validation loss against training energy,
    /// with the Pareto front drawn.
    Compare(commands::compare::Args),
    /// Write a run's model (final/, else its newest checkpoint) or a model folder in the Hugging
    /// Face layout, with a model card.
    Export(commands::export::Args),
    /// Upload a run's model (exported first, to RUN_DIR/hf, when it has not been) or an export
    /// folder to the Hugging Face Hub, in one commit. The token comes from HF_TOKEN or the
    /// Hugging Face token file and is never printed.
    Publish(commands::publish::Args),
    /// Answer a question from a retrieval index: the best passages and the question in one
    /// prompt, a greedy answer through the chat template, and its sources.
    Ask(commands::ask::Args),
    /// Retrieval indexes: build one over a corpus, add documents, query it.
    Index {
        #[command(subcommand)]
        command: commands::index::Args,
    },
    /// Time a linear layer's three GEMMs at given shapes through Burn's matmul and, on CUDA,
    /// cuBLASLt (train.cublaslt), with the largest difference between the two: one JSON line a GEMM.
    BenchGemm(commands::bench_gemm::Args),
    /// Time causal attention's forward and backward at given shapes through the fused op's
    /// recomputing path and, on wgpu and CUDA, Kiln's flash kernels (train.flash_attention), with
    /// the largest difference between the two: one JSON line a path and shape.
    BenchAttention(commands::bench_attention::Args),
    /// Tokenizer tools.
    Tokenizer {
        #[command(subcommand)]
        command: commands::tokenizer::Args,
    },
}

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tantivy=warn,cubecl_wgpu=warn,cubecl_runtime=warn,wgpu_core=warn,wgpu_hal=warn,naga=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let cli = Cli::parse();
    // The coordinator's tokio tasks may panic when a worker drops out; tokio contains those.
    if !matches!(cli.command, Command::Coordinator { .. }) {
        exit_on_background_panic();
    }
    kiln_trainer::register_fused_ops();
    if let Err(e) = dispatch(cli.command) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(a) => commands::run::run(a),
        Command::Coordinator { listen } => kiln_trainer::dist::run_coordinator(&listen),
        Command::Resume(a) => commands::resume::run(a),
        Command::Recipe { command } => commands::recipe::run(command),
        Command::Generate(a) => commands::generate::run(a),
        Command::Chat(a) => commands::chat::run(a),
        Command::Data { command } => commands::data::run(command),
        Command::Eval(a) => commands::eval::run(a),
        Command::Compare(a) => commands::compare::run(a),
        Command::Export(a) => commands::export::run(a),
        Command::Publish(a) => commands::publish::run(a),
        Command::Ask(a) => commands::ask::run(a),
        Command::Index { command } => commands::index::run(command),
        Command::Tokenizer { command } => commands::tokenizer::run(command),
        Command::BenchGemm(a) => commands::bench_gemm::run(a),
        Command::BenchAttention(a) => commands::bench_attention::run(a),
    }
}

/// A panic on a thread other than `main` ends the process (after the usual panic message). The
/// GPU backends run each device's work on a thread of their own; when that thread panicked (a
/// kernel that would not compile), the main thread waited on it forever. Checkpoints are written
/// to a temporary name and renamed, so stopping here never leaves a damaged one. A data-parallel
/// run replaces this hook with its own (dist.rs), which turns the collective layer's panics into
/// errors.
fn exit_on_background_panic() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        let thread = std::thread::current();
        if thread.name() != Some("main") {
            eprintln!("error: background thread '{}' panicked (above); stopping rather than waiting on it forever. The run's last complete checkpoint is kept", thread.name().unwrap_or("?"));
            std::process::exit(101);
        }
    }));
}
