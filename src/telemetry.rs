//! tracing subscriber: `log.format: text | json` on stderr, level or filter from `log.level`.
//! In JSON the event's fields are flattened to the top level, so the summary line's keys
//! are the same in both formats.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.with_ansi(false).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    // A second init (tests in one process) keeps the first subscriber; nothing to do.
    drop(result);
}
