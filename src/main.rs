use std::io::Write;

use clap::Parser;
use streamhelper::format::printable;

mod cli;

fn main() {
    let cli = cli::Cli::parse();
    let mut logger = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if let Some(path) = cli::log_file(&cli) {
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
    // Messages carry task names, keys and errors from peers: one line per record, no
    // terminal control, whatever they contain.
    logger.format(|buf, record| {
        let style = buf.default_level_style(record.level());
        let message = record.args().to_string();
        let (level, target) = (record.level(), record.target());
        writeln!(buf, "[{} {style}{level:<5}{style:#} {target}] {}", buf.timestamp_millis(), printable(&message))
    });
    logger.init();
    if let Err(e) = cli::run(cli) {
        eprintln!("error: {}", printable(&e.to_string()));
        std::process::exit(1);
    }
}
