//! One tracing setup for every binary: logs on stderr (stdout stays free for audit lines and
//! command output), `json` with the event's fields at the top level of each line, or `plain`.

use std::io::IsTerminal as _;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Plain,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "json" => Ok(LogFormat::Json),
            "plain" => Ok(LogFormat::Plain),
            other => Err(format!("{other:?} is not a log format: use json or plain")),
        }
    }
}

/// Checks a tracing filter, e.g. `info` or `info,palisade_proxy=debug`.
pub fn parse_filter(filter: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| {
        format!(
            "{filter:?} is not a tracing filter ({e}): use info, debug, or palisade_proxy=debug,info"
        )
    })
}

/// Installs the process's subscriber. A second call (a test harness, an embedding process)
/// leaves the first in place.
pub fn init(filter: &str, format: LogFormat) -> Result<(), String> {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(parse_filter(filter)?)
        .with_ansi(format == LogFormat::Plain && std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Plain => builder.try_init(),
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_filters_are_checked() {
        assert_eq!("json".parse(), Ok(LogFormat::Json));
        assert_eq!("plain".parse(), Ok(LogFormat::Plain));
        assert!(
            "xml"
                .parse::<LogFormat>()
                .unwrap_err()
                .contains("json or plain")
        );
        assert!(parse_filter("info,palisade_ca=debug").is_ok());
        assert!(parse_filter("palisade=[[[bad").is_err());
    }
}
