use std::io::Write;

use clap::Parser;
use streamhelper::text::printable;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        // Messages carry task names, keys and errors from peers: one line per record, no
        // terminal control, whatever they contain.
        .format(|buf, record| {
            let level_style = buf.default_level_style(record.level());
            let message = record.args().to_string();
            writeln!(
                buf,
                "[{} {level_style}{:<5}{level_style:#} {}] {}",
                buf.timestamp(),
                record.level(),
                record.target(),
                printable(&message)
            )
        })
        .init();
    let cli = streamhelper::cli::Cli::parse();
    if let Err(e) = streamhelper::cli::run(cli) {
        eprintln!("error: {}", printable(&e.to_string()));
        std::process::exit(1);
    }
}
