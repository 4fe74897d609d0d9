use clap::Parser;

fn main() {
    let cli = streamhelper::cli::Cli::parse();
    let mut logger = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if let Some(path) = streamhelper::cli::log_file(&cli) {
        match std::fs::File::create(&path) {
            Ok(file) => {
                logger.target(env_logger::Target::Pipe(Box::new(file)));
            }
            Err(e) => {
                eprintln!("error: cannot create the log file {}: {e}", path.display());
                std::process::exit(1);
            }
        }
    }
    logger.init();
    if let Err(e) = streamhelper::cli::run(cli) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
