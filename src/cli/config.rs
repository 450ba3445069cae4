//! `volley config`: the `volley serve` configuration file checked line by line
//! without starting anything, and a complete commented example to start from.

use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub(crate) enum ConfigCmd {
    /// Check a `volley serve` configuration file: every bad key or value with its line.
    Check { file: PathBuf },
    /// Print a complete, commented configuration file with every default.
    Example,
}

pub(crate) fn run(cmd: ConfigCmd) -> anyhow::Result<i32> {
    match cmd {
        ConfigCmd::Check { file } => {
            let checked =
                volley::serve::config::ServeConfig::load(&file).and_then(|c| c.check().map(|()| c));
            match checked {
                Ok(_) => {
                    println!("{}: ok", file.display());
                    Ok(0)
                }
                Err(problems) => {
                    for p in &problems {
                        println!("{p}");
                    }
                    Ok(1)
                }
            }
        }
        ConfigCmd::Example => {
            print!("{}", volley::serve::config::EXAMPLE);
            Ok(0)
        }
    }
}
