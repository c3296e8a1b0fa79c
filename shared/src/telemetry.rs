//! Tracing set-up shared by every binary: text or JSON logs on stderr, filtered by `RUST_LOG`
//! or `log.level`.

use tracing_subscriber::EnvFilter;

use crate::config::LogSettings;

/// Installs the global subscriber; a second call is a no-op (tests call it repeatedly).
pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if settings.format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
