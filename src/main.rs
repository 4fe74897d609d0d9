use clap::Parser;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = streamhelper::cli::Cli::parse();
    if let Err(e) = streamhelper::cli::run(cli) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
