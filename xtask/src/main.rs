use clap::{CommandFactory, FromArgMatches};

/// Chat templates from downloaded models render under a memory budget (em_data::MAX_TEMPLATE_MEMORY).
#[global_allocator]
static ALLOC: em_alloc::BudgetAlloc = em_alloc::BudgetAlloc;

fn main() {
    // Training frees and allocates the same large activations every pass: keep them in the heap.
    em_alloc::reuse_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let matches = xtask::cli::Cli::command().get_matches();
    let result = xtask::cli::Cli::from_arg_matches(&matches)
        .map_err(anyhow::Error::from)
        .and_then(|cli| xtask::cli::run(cli, &matches));
    if std::env::var_os("EM_REPORT_PEAK_RSS").is_some() {
        if let Some(mb) = em_pipeline::peak_rss_mb() {
            eprintln!("peak_rss_mb={mb:.1}");
        }
    }
    if let Err(e) = result {
        // One line, naming the file and what is wrong (the context chain joined by ": ").
        let msg = format!("{e:#}").replace('\n', " ");
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}
