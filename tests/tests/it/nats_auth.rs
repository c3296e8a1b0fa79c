//! Least privilege on NATS (issue 7): the services run against a nats-server configured with
//! deploy/nats/rowsmith-auth.conf, each as its own user; a job completes; a client without
//! credentials is refused; a service cannot publish on a subject that is not its own.

use std::path::Path;
use std::time::Duration;

use rowsmith_bus::Bus;
use rowsmith_config::NatsSettings;
use rowsmith_contract::records::JobState;
use rowsmith_tests::{NatsServer, Stack};

use crate::pipeline::{awkward_rows, spec, to_csv};

const USERS: [&str; 6] = ["ingest", "submitter", "poller", "merger", "cli", "admin"];

fn password(user: &str) -> String {
    format!("p{user}-{}", nuid::next().to_string().to_lowercase())
}

fn as_user(nats: &NatsSettings, user: &str, passwords: &[(String, String)]) -> NatsSettings {
    let mut settings = nats.clone();
    settings.user = Some(user.to_owned());
    let password = passwords
        .iter()
        .find(|(u, _)| u == user)
        .expect("user")
        .1
        .clone();
    settings.password = Some(password.into());
    settings.request_timeout = Duration::from_secs(3);
    settings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn services_run_as_their_own_users_and_nothing_more() {
    let passwords: Vec<(String, String)> =
        USERS.iter().map(|u| (u.to_string(), password(u))).collect();
    let env: Vec<(String, String)> = passwords
        .iter()
        .map(|(u, p)| (format!("{}_PASSWORD", u.to_uppercase()), p.clone()))
        .collect();
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    // The strict variant: no service may create or change the streams; `rowsmith setup`
    // (the admin user) makes them once.
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats/rowsmith-auth.conf");
    let strict: String = std::fs::read_to_string(&config)
        .expect("rowsmith-auth.conf")
        .lines()
        .filter(|line| !line.trim_end().ends_with("# topology"))
        .map(|line| format!("{line}\n"))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write(dir.path(), "rowsmith-auth-strict.conf", &strict);
    let nats = NatsServer::start_with_config(&config, &env_refs);
    let url = nats.url();

    // Nobody gets in without credentials, or with another user's password.
    let anonymous = NatsSettings {
        url: url.clone(),
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let error = Bus::connect(&anonymous, "anonymous")
        .await
        .expect_err("refused");
    assert!(error.is_authorization(), "{error}");
    let mut wrong = as_user(&anonymous, "ingest", &passwords);
    wrong.password = Some(passwords[1].1.clone().into());
    let error = Bus::connect_retrying(
        &wrong,
        "wrong",
        &tokio_util::sync::CancellationToken::new(),
        Duration::from_secs(60),
    )
    .await
    .expect_err("refused");
    assert!(error.is_authorization(), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "bad credentials must fail fast, took {:?}",
        started.elapsed()
    );

    // Without the set-up step a service says what to do.
    let mut ingest = as_user(&anonymous, "ingest", &passwords);
    ingest.ensure_topology = false;
    let error = Bus::connect(&ingest, "ingest")
        .await
        .expect_err("no streams yet");
    assert!(error.to_string().contains("rowsmith setup"), "{error}");
    // ...and may not create them itself.
    ingest.ensure_topology = true;
    assert!(Bus::connect(&ingest, "ingest").await.is_err());
    Bus::connect(&as_user(&anonymous, "admin", &passwords), "setup")
        .await
        .expect("admin creates the topology");

    // Each service as its own user; the test itself acts as the CLI user.
    let stack = Stack::start_on(
        nats,
        |settings| {
            settings.nats = as_user(&anonymous, "cli", &passwords);
            settings.nats.ensure_topology = false;
        },
        &["ingest", "submitter", "poller", "merger"],
        |service, settings| {
            settings.nats = as_user(&anonymous, service, &passwords);
            settings.nats.ensure_topology = false;
        },
    )
    .await;
    let rows = awkward_rows(300);
    let input = stack.upload_input("auth.csv", to_csv(&rows)).await;
    stack
        .submit(&spec("least-privilege", &input, "description"))
        .await;
    let job = stack
        .wait_for_end("least-privilege", Duration::from_secs(120))
        .await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!(
        job.counts.succeeded + job.counts.rows_skipped,
        rows.len() as u64
    );
    // The Anthropic format writes two more kinds of record as the submitter: the provider's
    // create mutex (`lease.*`) and which shard a batch is for (`batch.*`).
    let mut anthropic = spec("least-privilege-anthropic", &input, "description");
    anthropic.provider = "anthropic".into();
    anthropic.model = "claude-3-5-haiku-latest".into();
    stack.submit(&anthropic).await;
    let job = stack
        .wait_for_end("least-privilege-anthropic", Duration::from_secs(120))
        .await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!(
        job.counts.succeeded + job.counts.rows_skipped,
        rows.len() as u64
    );
    // ...and the providers it holds a key for (`capability.*`).
    let (capability, _) = stack
        .bus
        .read::<rowsmith_contract::records::SubmitterCapability>(
            rowsmith_contract::records::SUBMITTER_CAPABILITY_KEY,
        )
        .await
        .expect("read")
        .expect("the submitter announced its providers");
    assert!(capability.providers.contains("anthropic"), "{capability:?}");

    // ingest may publish shards.ready, not batches.ended: the server refuses the publish.
    let (sender, mut errors) = tokio::sync::mpsc::unbounded_channel();
    let ingest = as_user(&anonymous, "ingest", &passwords);
    let client =
        async_nats::ConnectOptions::with_user_and_password("ingest".into(), passwords[0].1.clone())
            .custom_inbox_prefix("_INBOX_ingest")
            .request_timeout(Some(Duration::from_secs(2)))
            .event_callback(move |event| {
                let sender = sender.clone();
                async move {
                    if let async_nats::Event::ServerError(error) = event {
                        let _ = sender.send(error.to_string());
                    }
                }
            })
            .connect(&ingest.url)
            .await
            .expect("ingest connects");
    client
        .publish("rowsmith.batches.ended", "{}".into())
        .await
        .expect("sent");
    client.flush().await.expect("flush");
    let refused = tokio::time::timeout(Duration::from_secs(10), errors.recv())
        .await
        .expect("a permissions error within 10 s")
        .expect("error");
    assert!(
        refused.contains("Permissions Violation") && refused.contains("rowsmith.batches.ended"),
        "{refused}"
    );
    // ...while its own subjects are allowed.
    let js = async_nats::jetstream::new(client.clone());
    let ack = js
        .publish("rowsmith.events.least-privilege.warning", "{}".into())
        .await
        .expect("publish")
        .await;
    assert!(ack.is_ok(), "ingest may publish events: {ack:?}");
    // And it cannot read another service's work: the merger's durable is not its own.
    let pulled = client
        .request(
            "$JS.API.CONSUMER.MSG.NEXT.ROWSMITH_WORK.merger",
            "{\"batch\":1,\"no_wait\":true}".into(),
        )
        .await;
    assert!(pulled.is_err(), "ingest pulled from merger's consumer");
}

/// Writes `text` to `dir/name` and returns the path.
fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_and_nkey_authentication_connect_and_wrong_ones_do_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let user = nkeys::KeyPair::new_user();
    let seed = write(dir.path(), "user.nk", &user.seed().expect("seed"));
    let token = format!("t{}", nuid::next());
    let config = write(
        dir.path(),
        "auth.conf",
        &format!("authorization {{\n  token: \"{token}\"\n}}\n"),
    );
    let nats = NatsServer::start_with_config(&config, &[]);
    let mut settings = NatsSettings {
        url: nats.url(),
        request_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    settings.token = Some(token.clone().into());
    Bus::connect(&settings, "token")
        .await
        .expect("the token is accepted");
    settings.token = Some("t-wrong".to_owned().into());
    let error = Bus::connect(&settings, "wrong-token")
        .await
        .expect_err("refused");
    assert!(error.is_authorization(), "{error}");

    let config = write(
        dir.path(),
        "nkey.conf",
        &format!(
            "authorization {{\n  users = [ {{ nkey: \"{}\" }} ]\n}}\n",
            user.public_key()
        ),
    );
    let nats = NatsServer::start_with_config(&config, &[]);
    let settings = NatsSettings {
        url: nats.url(),
        nkey_seed_file: Some(seed),
        request_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    Bus::connect(&settings, "nkey")
        .await
        .expect("the nkey is accepted");
    let other = write(
        dir.path(),
        "other.nk",
        &nkeys::KeyPair::new_user().seed().expect("seed"),
    );
    let settings = NatsSettings {
        nkey_seed_file: Some(other),
        ..settings
    };
    let error = Bus::connect(&settings, "other-nkey")
        .await
        .expect_err("refused");
    assert!(error.is_authorization(), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_connects_with_the_client_certificate_and_not_without() {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("ca");
    let issue = |names: Vec<String>, purpose: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(names).expect("params");
        params.extended_key_usages = vec![purpose];
        let cert = params.signed_by(&key, &ca_cert, &ca_key).expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = issue(
        vec!["localhost".into(), "127.0.0.1".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) =
        issue(vec!["ingest".into()], ExtendedKeyUsagePurpose::ClientAuth);
    let ca_file = write(dir.path(), "ca.pem", &ca_cert.pem());
    let server_cert = write(dir.path(), "server.pem", &server_cert);
    let server_key = write(dir.path(), "server-key.pem", &server_key);
    let config = write(
        dir.path(),
        "tls.conf",
        &format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n}}\n",
            server_cert.display(),
            server_key.display(),
            ca_file.display()
        ),
    );
    let nats = NatsServer::start_with_config(&config, &[]);
    let url = nats.url().replace("127.0.0.1", "localhost");
    let mut settings = NatsSettings {
        url,
        tls_ca_file: Some(ca_file),
        tls_cert_file: Some(write(dir.path(), "client.pem", &client_cert)),
        tls_key_file: Some(write(dir.path(), "client-key.pem", &client_key)),
        request_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    let bus = Bus::connect(&settings, "mtls")
        .await
        .expect("mutual TLS connects");
    bus.kv
        .put("tls-check", "ok".into())
        .await
        .expect("a KV write over TLS");
    settings.tls_cert_file = None;
    settings.tls_key_file = None;
    assert!(
        Bus::connect(&settings, "no-client-cert").await.is_err(),
        "a client without its certificate must be refused"
    );
}
