//! Each service keeps only its own sections of the configuration: the provider keys reach
//! the two services that call providers and no other.

use rowsmith_config::Settings;
use rowsmith_runtime::ServiceSettings;
use secrecy::ExposeSecret;

fn with_keys() -> Settings {
    let mut settings = Settings::default();
    settings.provider.openai.api_key = Some("sk-openai-test-key".to_owned().into());
    settings.provider.anthropic.api_key = Some("sk-ant-test-key".to_owned().into());
    settings.ingest.concurrency = 3;
    settings.merger.concurrency = 5;
    settings
}

#[test]
fn only_the_submitter_and_the_poller_hold_provider_keys() {
    let ingest = format!("{:?}", rowsmith_ingest::Config::from_settings(with_keys()));
    let merger = format!("{:?}", rowsmith_merger::Config::from_settings(with_keys()));
    for (service, shown) in [("ingest", &ingest), ("merger", &merger)] {
        for section in [
            "provider",
            "openai",
            "anthropic",
            "api_key",
            "creation",
            "poller",
        ] {
            assert!(
                !shown.contains(section),
                "{service} holds {section}: {shown}"
            );
        }
    }
    assert!(
        ingest.contains("concurrency: 3") && !ingest.contains("concurrency: 5"),
        "{ingest}"
    );
    assert!(
        merger.contains("concurrency: 5") && !merger.contains("concurrency: 3"),
        "{merger}"
    );

    let submitter = rowsmith_submitter::Config::from_settings(with_keys());
    let poller = rowsmith_poller::Config::from_settings(with_keys());
    for provider in [&submitter.provider, &poller.provider] {
        let openai = provider.openai.api_key.as_ref().expect("OpenAI key");
        assert_eq!(openai.expose_secret(), "sk-openai-test-key");
        let anthropic = provider.anthropic.api_key.as_ref().expect("Anthropic key");
        assert_eq!(anthropic.expose_secret(), "sk-ant-test-key");
    }
    for (service, shown) in [
        ("submitter", format!("{submitter:?}")),
        ("poller", format!("{poller:?}")),
    ] {
        for section in ["duckdb", "cache", "output", "limits", "prices"] {
            assert!(
                !shown.contains(section),
                "{service} holds {section}: {shown}"
            );
        }
    }
}
