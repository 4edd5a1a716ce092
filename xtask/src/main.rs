use clap::Parser;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = xtask::cli::Cli::parse();
    if let Err(e) = xtask::cli::run(cli) {
        // One line, naming the file and what is wrong (the context chain joined by ": ").
        let msg = format!("{e:#}").replace('\n', " ");
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}
