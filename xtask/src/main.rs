use clap::Parser;

/// Chat templates from downloaded models render under a memory budget (em_data::MAX_TEMPLATE_MEMORY).
#[global_allocator]
static ALLOC: em_alloc::BudgetAlloc = em_alloc::BudgetAlloc;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = xtask::cli::Cli::parse();
    let result = xtask::cli::run(cli);
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
