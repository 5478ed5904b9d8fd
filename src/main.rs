//! The `ratepool` binary: parses the command line and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

use ratepool::client::ApiClient;
use ratepool::serve::{self, Simulate};

#[derive(Parser)]
#[command(name = "ratepool", version, about = "Durable LLM job chains over a pool of provider organizations")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ClientArgs {
    /// The ratepool server.
    #[arg(long, env = "RATEPOOL_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// A file holding the tenant API key (else RATEPOOL_API_KEY).
    #[arg(long, env = "RATEPOOL_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
}

impl ClientArgs {
    fn client(&self) -> anyhow::Result<ApiClient> {
        let key = match &self.api_key_file {
            Some(f) => std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
            None => std::env::var("RATEPOOL_API_KEY")
                .context("set RATEPOOL_API_KEY or --api-key-file to the tenant's API key")?,
        };
        ApiClient::new(&self.url, SecretString::from(key.trim().to_string()))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the API and the workers in one process.
    Serve {
        /// The config file; else RATEPOOL_CONFIG_TOML holds its text.
        #[arg(long, env = "RATEPOOL_CONFIG")]
        config: Option<PathBuf>,
        /// Use the built-in simulator even if provider keys are set.
        #[arg(long)]
        simulate: bool,
        /// Log JSON lines instead of text.
        #[arg(long)]
        json_logs: bool,
    },
    /// Run workers only (the Fargate task); `--listen` also serves the API.
    Worker {
        /// The config file; else RATEPOOL_CONFIG_TOML holds its text.
        #[arg(long, env = "RATEPOOL_CONFIG")]
        config: Option<PathBuf>,
        /// Log text instead of JSON lines.
        #[arg(long)]
        text_logs: bool,
        /// Also serve the API here (the OpenAI-compatible calls door and
        /// the jobs routes), e.g. `0.0.0.0:8080` behind a load balancer.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// AWS resources.
    Aws {
        #[command(subcommand)]
        command: AwsCommand,
    },
    /// The PostgreSQL backend's schema.
    Postgres {
        #[command(subcommand)]
        command: PostgresCommand,
    },
    /// The dead-letter queue: list it, re-drive its messages, or fail their jobs.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Run the OpenAI-compatible provider simulator.
    Sim {
        #[arg(long)]
        config: PathBuf,
        /// Overrides the config's listen address.
        #[arg(long)]
        listen: Option<String>,
    },
    /// A do-nothing HTTP relay to `--to`: the benchmark's reference for
    /// what any proxy process on a call's path costs (figure 10).
    #[command(hide = true)]
    Relay {
        #[arg(long)]
        to: String,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
    },
    /// Submit a job spec (JSON file).
    Submit {
        file: PathBuf,
        /// Wait for the job to finish, with a progress bar.
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show a job's status.
    Status {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a finished job's outputs.
    Result {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cancel a job.
    Cancel {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Run the benchmark (`make bench`); prints the Markdown tables of
    /// BENCHMARKS.md and writes every run's figures as JSON.
    Bench {
        /// Runs of each figure; the report quotes their median.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Small workloads: checks the benchmark works, measures nothing.
        #[arg(long)]
        quick: bool,
        /// Only these figures (default: all).
        #[arg(long, value_enum, value_delimiter = ',')]
        only: Vec<ratepool::bench::Figure>,
        /// Working directory for the runs' databases and logs.
        #[arg(long, default_value = "target/bench")]
        work_dir: PathBuf,
        /// Where to write the results as JSON.
        #[arg(long, default_value = "target/bench/results.json")]
        json: PathBuf,
        /// The emulator (or AWS) endpoint for the DynamoDB ledger figures;
        /// without it they are skipped.
        #[arg(long, env = "AWS_ENDPOINT_URL")]
        aws_endpoint: Option<String>,
        /// A PostgreSQL server for the PostgreSQL figures (each run creates
        /// a database on it); without it they are skipped.
        #[arg(long, env = "RATEPOOL_TEST_POSTGRES_URL")]
        postgres_server: Option<String>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Check a config file as `serve` and `worker` read it, without
    /// starting anything or reading any key: prints `FILE: ok`, or exits 1
    /// naming the line and the reason (the CDK app runs it at synth).
    Check { file: PathBuf },
}

#[derive(Subcommand)]
enum AwsCommand {
    /// Create the tables and queues of `[aws]` that do not exist yet (for
    /// the emulator and dev accounts; production gets them from the CDK app).
    Init {
        #[arg(long, env = "RATEPOOL_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PostgresCommand {
    /// Apply the schema migrations the database lacks (the URL comes from
    /// the environment variable `[postgres] url_env` names). Safe to run
    /// again, and beside running processes of the same version.
    Migrate {
        #[arg(long, env = "RATEPOOL_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct DlqTarget {
    /// Only this job's dead letters.
    #[arg(long, conflicts_with = "all", required_unless_present = "all")]
    job: Option<String>,
    /// Every dead letter.
    #[arg(long)]
    all: bool,
}

impl DlqTarget {
    fn job(&self) -> anyhow::Result<Option<ratepool::domain::JobId>> {
        self.job
            .as_deref()
            .map(|j| ratepool::domain::JobId::parse(j).map_err(|e| anyhow::anyhow!("--job: {e}")))
            .transpose()
    }
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Job id, tenant, job status, receives and age of each dead letter.
    List {
        #[arg(long, env = "RATEPOOL_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Move dead letters back to their work queue.
    Redrive {
        #[arg(long, env = "RATEPOOL_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        target: DlqTarget,
    },
    /// Fail the dead letters' jobs with "dead-lettered: REASON" and delete the dead letters.
    Fail {
        #[arg(long, env = "RATEPOOL_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        target: DlqTarget,
        /// Why, for the job's error.
        #[arg(long)]
        reason: String,
    },
}

fn print(v: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn main_inner(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config, simulate, json_logs } => {
            ratepool::telemetry::init_logging(json_logs);
            let cfg = serve::load_config(config.as_deref())?;
            let shutdown = CancellationToken::new();
            serve::cancel_on_signals(shutdown.clone());
            serve::run(cfg, if simulate { Simulate::Always } else { Simulate::Auto }, shutdown).await
        }
        Command::Worker { config, text_logs, listen } => {
            ratepool::telemetry::init_logging(!text_logs);
            let cfg = serve::load_config(config.as_deref())?;
            let shutdown = CancellationToken::new();
            serve::cancel_on_signals(shutdown.clone());
            serve::worker(cfg, listen, shutdown).await
        }
        Command::Config { command: ConfigCommand::Check { file } } => {
            ratepool::config::Config::load(&file)?;
            println!("{}: ok", file.display());
            Ok(())
        }
        Command::Aws { command: AwsCommand::Init { config } } => {
            ratepool::telemetry::init_logging(false);
            let cfg = serve::load_config(config.as_deref())?;
            let clients = ratepool::aws::AwsClients::load(&cfg.aws).await;
            let created = ratepool::aws::init(&clients, &cfg.aws, cfg.workers.visibility_timeout()).await?;
            if created.is_empty() {
                println!("all tables and queues exist");
            }
            for name in created {
                println!("created {name}");
            }
            Ok(())
        }
        Command::Postgres { command: PostgresCommand::Migrate { config } } => {
            ratepool::telemetry::init_logging(false);
            let cfg = serve::load_config(config.as_deref())?;
            let url = cfg.postgres.url().map_err(anyhow::Error::msg)?;
            let applied = ratepool::postgres::migrate_url(&url).await?;
            if applied.is_empty() {
                println!("the schema is up to date");
            }
            for version in applied {
                println!("applied migration {version}");
            }
            Ok(())
        }
        Command::Dlq { command } => {
            ratepool::telemetry::init_logging(false);
            let config = match &command {
                DlqCommand::List { config } | DlqCommand::Redrive { config, .. } | DlqCommand::Fail { config, .. } => {
                    config.clone()
                }
            };
            // Bad arguments are refused before anything is opened.
            let job = match &command {
                DlqCommand::List { .. } => None,
                DlqCommand::Redrive { target, .. } | DlqCommand::Fail { target, .. } => target.job()?,
            };
            if let DlqCommand::Fail { reason, .. } = &command
                && reason.trim().is_empty()
            {
                anyhow::bail!("--reason: must not be empty");
            }
            let cfg = serve::load_config(config.as_deref())?;
            let clock = ratepool::domain::SystemClock;
            let (backend, _) = serve::open_store(&cfg, std::sync::Arc::new(clock)).await?;
            if cfg.storage.backend != ratepool::config::StorageKind::Aws {
                eprintln!(
                    "SQLite and PostgreSQL have no SQS redrive: its dead letters are the jobs the workers failed as poison \
                     (max_receives runs in a row that crashed without finishing a step), already failed with the reason"
                );
            }
            match command {
                DlqCommand::List { .. } => print(&serde_json::to_value(ratepool::dlq::list(&backend, &clock).await?)?),
                DlqCommand::Redrive { .. } => {
                    let moved = ratepool::dlq::redrive(&backend, job.as_ref()).await?;
                    print(&serde_json::json!({ "redriven": moved }))
                }
                DlqCommand::Fail { reason, .. } => {
                    let failed = ratepool::dlq::fail(&backend, &clock, job.as_ref(), reason.trim()).await?;
                    print(&serde_json::json!({ "failed": failed }))
                }
            }
        }
        Command::Sim { config, listen } => {
            ratepool::telemetry::init_logging(false);
            let text = std::fs::read_to_string(&config).with_context(|| format!("reading {}", config.display()))?;
            let mut cfg =
                ratepool::sim::SimConfig::from_toml(&text).with_context(|| format!("in {}", config.display()))?;
            if listen.is_some() {
                cfg.listen = listen;
            }
            let listener = tokio::net::TcpListener::bind(cfg.listen_addr())
                .await
                .with_context(|| format!("cannot listen on {}", cfg.listen_addr()))?;
            println!("ratepool sim listening on http://{}", listener.local_addr()?);
            let sim = ratepool::sim::Simulator::new(cfg, std::sync::Arc::new(ratepool::domain::SystemClock));
            let shutdown = CancellationToken::new();
            serve::cancel_on_signals(shutdown.clone());
            ratepool::sim::serve(listener, sim, async move { shutdown.cancelled().await }).await?;
            Ok(())
        }
        Command::Relay { to, listen } => {
            let listener =
                tokio::net::TcpListener::bind(&listen).await.with_context(|| format!("cannot listen on {listen}"))?;
            println!("ratepool relay listening on http://{}", listener.local_addr()?);
            ratepool::bench::relay::serve(listener, &to).await
        }
        Command::Submit { file, wait, idempotency_key, client } => {
            let api = client.client()?;
            let spec = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let accepted = api.submit(spec, idempotency_key.as_deref()).await?;
            let Some(id) = accepted["id"].as_str() else { anyhow::bail!("unexpected answer: {accepted}") };
            if !wait {
                return print(&accepted);
            }
            eprintln!("job {id} accepted");
            let job = api.wait(id).await?;
            print(&job)?;
            if job["status"] != "succeeded" {
                anyhow::bail!("job {id} ended {}", job["status"]);
            }
            Ok(())
        }
        Command::Status { id, client } => print(&client.client()?.status(&id).await?),
        Command::Result { id, client } => print(&client.client()?.result(&id).await?),
        Command::Cancel { id, client } => print(&client.client()?.cancel(&id).await?),
        Command::Bench { runs, quick, only, work_dir, json, aws_endpoint, postgres_server } => {
            use ratepool::bench;
            std::fs::create_dir_all(&work_dir)?;
            let opts = bench::Options {
                runs: runs.max(1),
                figures: if only.is_empty() { bench::Figure::ALL.to_vec() } else { only },
                ctx: bench::Ctx {
                    bin: std::env::current_exe()?,
                    work: work_dir,
                    sizes: if quick { bench::Sizes::quick() } else { bench::Sizes::full() },
                    aws_endpoint,
                    postgres_server,
                },
            };
            let results = bench::run(&opts, quick).await?;
            if let Some(dir) = json.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&json, serde_json::to_string_pretty(&results)?)?;
            println!("{}", bench::report(&results));
            eprintln!("every run's figures: {}", json.display());
            Ok(())
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match main_inner(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
