//! Tracing set-up shared by every binary: text or JSON logs on stderr, filtered by `RUST_LOG`
//! or `log.level`; OpenTelemetry spans whose W3C trace context travels in NATS headers
//! (`traceparent`), so a job is one trace across services; OTLP/HTTP export when
//! `telemetry.otlp_endpoint` is set.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use rowsmith_config::{LogSettings, TelemetrySettings};

/// Flushes and stops span export when dropped (at the end of `main`).
#[derive(Debug)]
pub struct Guard(Option<SdkTracerProvider>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(provider) = self.0.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global subscriber and propagator; a second call is a no-op (tests call it
/// repeatedly). Call it before starting a tokio runtime when exporting (the OTLP exporter
/// builds a blocking HTTP client).
pub fn init(log: &LogSettings, telemetry: &TelemetrySettings, service: &str) -> Guard {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let mut builder = SdkTracerProvider::builder().with_resource(
        opentelemetry_sdk::Resource::builder()
            .with_service_name(service.to_owned())
            .build(),
    );
    if let Some(endpoint) = telemetry.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        use opentelemetry_otlp::WithExportConfig;
        let endpoint = match endpoint.trim_end_matches('/') {
            e if e.ends_with("/v1/traces") => e.to_owned(),
            e => format!("{e}/v1/traces"),
        };
        match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint.clone())
            .build()
        {
            Ok(exporter) => builder = builder.with_batch_exporter(exporter),
            Err(error) => eprintln!("warning: spans will not be exported to {endpoint}: {error}"),
        }
    }
    let provider = builder.build();
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("rowsmith"));
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if log.format == "json" {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    // Spans are recorded for tracing at info whatever the log level, so that a job's trace
    // is whole even when logs are quiet.
    let installed = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel.with_filter(tracing_subscriber::filter::LevelFilter::INFO))
        .try_init()
        .is_ok();
    if installed {
        opentelemetry::global::set_tracer_provider(provider.clone());
        Guard(Some(provider))
    } else {
        Guard(None)
    }
}

/// Cancels `shutdown` on the first SIGINT or SIGTERM and exits the process on the second.
pub async fn shutdown_on_signals(shutdown: tokio_util::sync::CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("signal handlers could not be installed");
        return;
    };
    for count in 0..2 {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        if count == 0 {
            tracing::info!(
                "shutting down: finishing messages in flight (signal again to exit now)"
            );
            shutdown.cancel();
        } else {
            std::process::exit(130);
        }
    }
}
