//! AWS Bedrock batch inference (model invocation jobs). A shard's records go to S3 under
//! `provider.bedrock.s3_uri` (the `.jsonl` Bedrock reads), a job is created for it with
//! `CreateModelInvocationJob` under a name that names the shard attempt and a
//! `clientRequestToken` derived from the shard and its uploaded file (a repeated create
//! returns the first job instead of making a second), its status is read with
//! `GetModelInvocationJob`, and its output (`<input>.jsonl.out`, a `{recordId, modelInput,
//! modelOutput | error}` line per record, and `manifest.json.out`) is copied from S3 into the
//! store. Every control-plane call is signed with SigV4 (object_store's signer, with the
//! credentials of the S3 client, so one set of AWS credentials serves both).

use std::sync::Arc;

use bytes::Bytes;
use object_store::aws::{AwsAuthorizer, AwsCredential, AwsCredentialProvider};
use reqwest::{Method, RequestBuilder};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::http::{Http, write_stream};
use super::{
    BatchProvider, BatchRef, BatchState, BatchStatus, CreateWindow, Limits, ProviderError,
    ResultFiles, ShardLines,
};
use rowsmith_config::BedrockSettings;
use rowsmith_contract::messages::ShardKey;
use rowsmith_store::layout::ResultPaths;
use rowsmith_store::{StorageError, Store};

const PROVIDER: &str = "bedrock";

/// The name of a job's input object (Bedrock wants `.jsonl`); its output is `<name>.out`.
const INPUT_FILE: &str = "input.jsonl";

/// The S3 bucket and prefix where shards go, through a store opened on the bucket.
#[derive(Clone)]
struct Bucket {
    store: Store,
    credentials: AwsCredentialProvider,
    name: String,
    prefix: String,
}

#[derive(Clone)]
pub struct BedrockClient {
    http: Http,
    base_url: String,
    region: String,
    role_arn: Option<String>,
    bucket: Option<Bucket>,
    has_credentials: bool,
    job_timeout_hours: u32,
    min_records: u64,
}

impl std::fmt::Debug for BedrockClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BedrockClient")
            .field("base_url", &self.base_url)
            .field("region", &self.region)
            .field("role_arn", &self.role_arn)
            .field(
                "s3",
                &self
                    .bucket
                    .as_ref()
                    .map(|b| format!("s3://{}/{}", b.name, b.prefix)),
            )
            .field("credentials", &self.has_credentials.then_some("[redacted]"))
            .finish()
    }
}

/// A job as `GetModelInvocationJob` and the list's summaries give it; only what rowsmith reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    pub job_arn: String,
    #[serde(default)]
    pub job_name: Option<String>,
    pub status: String,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub submit_time: Option<String>,
    #[serde(default)]
    pub input_data_config: Option<Value>,
    #[serde(default)]
    pub output_data_config: Option<Value>,
    #[serde(default)]
    pub total_record_count: Option<u64>,
    #[serde(default)]
    pub success_record_count: Option<u64>,
    #[serde(default)]
    pub error_record_count: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JobList {
    #[serde(default)]
    invocation_job_summaries: Vec<Job>,
    #[serde(default)]
    next_token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Created {
    job_arn: String,
}

/// A Bedrock status on rowsmith's scale. `PartiallyCompleted` (the timeout came while it ran)
/// is an expiry with partial results, as OpenAI's `expired`; `Expired` (never started) keeps
/// none; `Stopped` is a cancel.
pub fn state_of(status: &str) -> BatchState {
    match status {
        "Submitted" | "Validating" => BatchState::Validating,
        "Scheduled" | "InProgress" => BatchState::InProgress,
        "Stopping" => BatchState::Cancelling,
        "Completed" => BatchState::Completed,
        "PartiallyCompleted" | "Expired" => BatchState::Expired,
        "Failed" => BatchState::Failed,
        "Stopped" => BatchState::Cancelled,
        other => BatchState::Other(other.to_owned()),
    }
}

/// The last segment of a job ARN: the 12-character job id, which is also the folder of its
/// output.
fn job_id_of(arn: &str) -> &str {
    arn.rsplit('/').next().unwrap_or(arn)
}

/// The start of every job name of shard attempt `key` (the upload's time follows): Bedrock
/// job names are `[a-zA-Z0-9]` then `[a-zA-Z0-9+.-]`, at most 63; a job id too long for that
/// is replaced by a hash of it.
pub fn job_name_prefix(key: &ShardKey) -> String {
    let job = key.job_id.replace('_', "+");
    let name = format!("rowsmith-{job}.{}.{}-", key.attempt, key.shard);
    // Room for the upload's time in ms (13 digits).
    if name.len() + 13 <= 63 {
        return name;
    }
    let digest = Sha256::digest(key.job_id.as_bytes());
    let hash: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("rowsmith-{hash}.{}.{}-", key.attempt, key.shard)
}

impl BedrockClient {
    pub fn new(settings: &BedrockSettings) -> Result<Self, ProviderError> {
        let http = Http::new(
            PROVIDER,
            settings.timeout,
            std::time::Duration::from_secs(60),
        )?;
        let base_url = settings
            .base_url
            .clone()
            .unwrap_or_else(|| format!("https://bedrock.{}.amazonaws.com", settings.region));
        let bucket = match &settings.s3_uri {
            Some(uri) => Some(Self::bucket(uri, settings)?),
            None => None,
        };
        Ok(Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            region: settings.region.clone(),
            role_arn: settings.role_arn.clone(),
            bucket,
            has_credentials: settings.ambient_credentials
                || (settings.s3.access_key_id.is_some() && settings.s3.secret_access_key.is_some()),
            job_timeout_hours: settings.job_timeout_hours.clamp(24, 168),
            min_records: settings.min_records,
        })
    }

    fn bucket(uri: &str, settings: &BedrockSettings) -> Result<Bucket, ProviderError> {
        let rest = uri.strip_prefix("s3://").unwrap_or_default();
        let (name, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let mut s3 = settings.s3.clone();
        let region = s3
            .region
            .get_or_insert_with(|| settings.region.clone())
            .clone();
        if s3.endpoint.is_none() {
            // AWS itself, whatever `AWS_ENDPOINT_URL` says: that variable points the store at
            // its own server (MinIO in compose), not at the bucket Bedrock reads.
            s3.endpoint = Some(format!("https://{name}.s3.{region}.amazonaws.com"));
            s3.path_style = Some(false);
            s3.allow_http = Some(false);
        }
        let (store, credentials) = Store::s3_with_credentials(&format!("s3://{name}"), &s3)?;
        Ok(Bucket {
            store,
            credentials,
            name: name.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
        })
    }

    /// Whether credentials, the service role and the bucket are all set: without them no
    /// call goes out.
    pub fn has_key(&self) -> bool {
        self.has_credentials && self.role_arn.is_some() && self.bucket.is_some()
    }

    /// The bucket, once everything a call needs is configured.
    fn configured(&self) -> Result<&Bucket, ProviderError> {
        match &self.bucket {
            Some(bucket) if self.has_key() => Ok(bucket),
            _ => Err(ProviderError::NoKey {
                provider: PROVIDER.into(),
            }),
        }
    }

    async fn credential(&self) -> Result<Arc<AwsCredential>, ProviderError> {
        let bucket = self.configured()?;
        bucket
            .credentials
            .get_credential()
            .await
            .map_err(|error| ProviderError::Transport {
                provider: PROVIDER.into(),
                operation: "read AWS credentials",
                source: error.into(),
            })
    }

    /// `method url` with `body`, signed for service `bedrock` in the client's region.
    fn signed(
        &self,
        credential: &AwsCredential,
        method: Method,
        url: &str,
        body: Option<&Bytes>,
    ) -> RequestBuilder {
        let builder = self.http.client.request(method.clone(), url);
        let Ok(uri) = url.parse::<http::Uri>() else {
            // Not a URL: reqwest refuses it when sent.
            return builder;
        };
        let payload = body.cloned().unwrap_or_default();
        let mut request = object_store::client::HttpRequest::new(payload.clone().into());
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        if body.is_some() {
            request.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
        }
        AwsAuthorizer::new(credential, PROVIDER, &self.region).authorize(&mut request, None);
        let mut builder = builder;
        for (name, value) in request.headers() {
            builder = builder.header(name, value);
        }
        match body {
            Some(_) => builder.body(payload),
            None => builder,
        }
    }

    /// A Bedrock 400 `ServiceQuotaExceededException` (too many submitted and running jobs)
    /// passes as jobs end: said as a 429, so the shard waits and tries again.
    fn quota_is_a_wait(error: ProviderError) -> ProviderError {
        match error {
            ProviderError::Http {
                provider,
                operation,
                status: 400,
                message,
            } if message.contains("ServiceQuotaExceededException") => ProviderError::Http {
                provider,
                operation,
                status: 429,
                message,
            },
            other => other,
        }
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        operation: &'static str,
        url: &str,
    ) -> Result<T, ProviderError> {
        let credential = self.credential().await?;
        let response = self
            .http
            .send(operation, || {
                self.signed(&credential, Method::GET, url, None)
            })
            .await?;
        self.http.json(operation, response).await
    }

    /// The body of `CreateModelInvocationJob` for shard attempt `key` and its uploaded file:
    /// the job named for the shard and the upload's time, the output beside the input, and a
    /// `clientRequestToken` that is the same for the same shard and file.
    pub fn create_request(
        &self,
        key: &ShardKey,
        model: &str,
        file_id: &str,
    ) -> Result<Value, ProviderError> {
        self.configured()?;
        let Some(folder) = file_id.strip_suffix(INPUT_FILE) else {
            return Err(ProviderError::InputGone {
                provider: PROVIDER.into(),
                file_id: file_id.into(),
                message: "not a file this client uploaded".into(),
            });
        };
        let uploaded_at = folder
            .trim_end_matches('/')
            .rsplit('.')
            .next()
            .unwrap_or_default();
        let mut token = Sha256::new();
        token.update(key.dotted().as_bytes());
        token.update([0]);
        token.update(file_id.as_bytes());
        let token: String = token
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(json!({
            "jobName": format!("{}{uploaded_at}", job_name_prefix(key)),
            "clientRequestToken": token,
            "roleArn": self.role_arn,
            "modelId": model,
            "inputDataConfig": {"s3InputDataConfig": {"s3Uri": file_id, "s3InputFormat": "JSONL"}},
            "outputDataConfig": {"s3OutputDataConfig": {"s3Uri": format!("{folder}output/")}},
            "timeoutDurationInHours": self.job_timeout_hours,
            "tags": [{"key": "rowsmith-shard", "value": key.dotted()}],
        }))
    }

    pub async fn job(&self, batch: &BatchRef) -> Result<Job, ProviderError> {
        let url = format!(
            "{}/model-invocation-job/{}",
            self.base_url,
            job_id_of(&batch.id)
        );
        self.get_json("retrieve batch", &url).await
    }

    /// The store key of `s3://<bucket>/<key>` in the client's bucket.
    fn key_of<'a>(&self, bucket: &Bucket, uri: &'a str) -> Result<&'a str, ProviderError> {
        uri.strip_prefix("s3://")
            .and_then(|rest| rest.strip_prefix(bucket.name.as_str()))
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| ProviderError::Decode {
                provider: PROVIDER.into(),
                operation: "read job output",
                source: format!("{uri} is not in s3://{}", bucket.name).into(),
            })
    }

    /// Copies object `from` of the bucket to `to` in `store`, as it is read.
    async fn copy(
        &self,
        bucket: &Bucket,
        from: &str,
        store: &Store,
        to: &str,
    ) -> Result<u64, ProviderError> {
        let body = bucket.store.stream(from).await?;
        write_stream(store, to, body, ProviderError::from).await
    }
}

impl Job {
    fn input_uri(&self) -> Option<&str> {
        self.input_data_config
            .as_ref()?
            .pointer("/s3InputDataConfig/s3Uri")?
            .as_str()
    }

    /// The job's output folder: `<outputDataConfig s3Uri>/<job id>/`.
    fn output_folder(&self) -> Option<String> {
        let prefix = self
            .output_data_config
            .as_ref()?
            .pointer("/s3OutputDataConfig/s3Uri")?
            .as_str()?;
        Some(format!(
            "{}/{}/",
            prefix.trim_end_matches('/'),
            job_id_of(&self.job_arn)
        ))
    }

    /// `<output folder><input file name>.out`: the answers.
    fn output_uri(&self) -> Option<String> {
        let input_name = self.input_uri()?.rsplit('/').next()?;
        Some(format!("{}{input_name}.out", self.output_folder()?))
    }

    pub fn to_status(&self) -> BatchStatus {
        let state = state_of(&self.status);
        let has_output = matches!(
            state,
            BatchState::Completed | BatchState::Expired | BatchState::Cancelled
        );
        BatchStatus {
            total: self.total_record_count.unwrap_or(0),
            completed: self.success_record_count.unwrap_or(0),
            failed: self.error_record_count.unwrap_or(0),
            output_file_id: has_output.then(|| self.output_uri()).flatten(),
            // Errors are lines of the output file; the manifest sits beside it.
            error_file_id: None,
            errors: match (&state, &self.message) {
                (BatchState::Failed, Some(message)) => vec![format!("{}: {message}", self.status)],
                (BatchState::Failed, None) => vec![format!("{}: the job failed", self.status)],
                _ => Vec::new(),
            },
            state,
        }
    }
}

impl BatchProvider for BedrockClient {
    fn name(&self) -> &str {
        PROVIDER
    }

    fn limits(&self) -> Limits {
        Limits {
            min_requests: self.min_records,
            ..rowsmith_contract::providers::BEDROCK
        }
    }

    /// Puts the records at `<prefix>/<job>/<attempt>.<shard>.<ms>/input.jsonl`, streamed from
    /// the store; the time makes each upload (and so each create's token) its own.
    async fn upload(&self, key: &ShardKey, lines: ShardLines) -> Result<String, ProviderError> {
        let bucket = self.configured()?;
        let at = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
        let folder = format!("{}/{}.{}.{at}", key.job_id, key.attempt, key.shard);
        let object = match bucket.prefix.as_str() {
            "" => format!("{folder}/{INPUT_FILE}"),
            prefix => format!("{prefix}/{folder}/{INPUT_FILE}"),
        };
        write_stream(&bucket.store, &object, lines.chunks(), ProviderError::from).await?;
        Ok(format!("s3://{}/{object}", bucket.name))
    }

    /// `CreateModelInvocationJob` for the uploaded file (see [`BedrockClient::create_request`]):
    /// a create sent again after its answer was lost returns the job the first one made.
    async fn create(
        &self,
        key: &ShardKey,
        model: &str,
        file_id: &str,
        _lines: ShardLines,
    ) -> Result<BatchRef, ProviderError> {
        let body = self.create_request(key, model, file_id)?;
        let body = Bytes::from(body.to_string());
        let credential = self.credential().await?;
        let url = format!("{}/model-invocation-job", self.base_url);
        let created: Created = self
            .http
            .create("create batch", || {
                self.signed(&credential, Method::POST, &url, Some(&body))
            })
            .await
            .map_err(Self::quota_is_a_wait)?;
        Ok(BatchRef {
            id: created.job_arn,
        })
    }

    /// Lists the jobs whose name holds the shard attempt's name (`nameContains`, newest
    /// first) and keeps those it names that did not fail, oldest first.
    async fn find(
        &self,
        key: &ShardKey,
        _window: &CreateWindow,
    ) -> Result<Vec<BatchRef>, ProviderError> {
        let wanted = job_name_prefix(key);
        let mut found: Vec<(String, BatchRef)> = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut url = reqwest::Url::parse(&format!("{}/model-invocation-jobs", self.base_url))
                .map_err(|error| ProviderError::Decode {
                    provider: PROVIDER.into(),
                    operation: "list batches",
                    source: error.into(),
                })?;
            url.query_pairs_mut()
                .append_pair("nameContains", &wanted)
                .append_pair("maxResults", "100")
                .append_pair("sortBy", "CreationTime")
                .append_pair("sortOrder", "Descending");
            if let Some(token) = &token {
                url.query_pairs_mut().append_pair("nextToken", token);
            }
            let page: JobList = self.get_json("list batches", url.as_str()).await?;
            for job in page.invocation_job_summaries {
                let named = job
                    .job_name
                    .as_deref()
                    .is_some_and(|name| name.starts_with(&wanted));
                if named && state_of(&job.status) != BatchState::Failed {
                    let submitted = job.submit_time.clone().unwrap_or_default();
                    found.push((submitted, BatchRef { id: job.job_arn }));
                }
            }
            token = page.next_token.filter(|t| !t.is_empty());
            if token.is_none() {
                break;
            }
        }
        // ISO 8601 in UTC sorts as text.
        found.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(found.into_iter().map(|(_, batch)| batch).collect())
    }

    fn tags_batches(&self) -> bool {
        true
    }

    async fn status(&self, batch: &BatchRef) -> Result<BatchStatus, ProviderError> {
        Ok(self.job(batch).await?.to_status())
    }

    /// Copies the `.jsonl.out` into the store (none when the job never ran) and keeps its
    /// `manifest.json.out` beside it (`<output>.manifest.json`): Bedrock's own record and
    /// token counts.
    async fn download(
        &self,
        status: &BatchStatus,
        store: &Store,
        into: &ResultPaths,
    ) -> Result<ResultFiles, ProviderError> {
        let bucket = self.configured()?;
        let mut files = ResultFiles::default();
        let Some(output) = status.output_file_id.as_deref() else {
            return Ok(files);
        };
        let from = self.key_of(bucket, output)?;
        match self.copy(bucket, from, store, &into.output).await {
            Ok(bytes) => {
                tracing::debug!(output, bytes, "Bedrock output copied");
                files.output_path = Some(into.output.clone());
            }
            // A job that expired before it started, or was stopped before any record ran,
            // writes no output.
            Err(ProviderError::Storage(StorageError::NotFound { .. }))
                if status.state != BatchState::Completed => {}
            Err(error) => return Err(error),
        }
        if let Some(folder) = from.rsplit_once('/').map(|(folder, _)| folder) {
            let manifest = format!("{folder}/manifest.json.out");
            let copy = format!("{}.manifest.json", into.output);
            match self.copy(bucket, &manifest, store, &copy).await {
                Ok(_) | Err(ProviderError::Storage(StorageError::NotFound { .. })) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(files)
    }

    async fn cancel(&self, batch: &BatchRef) -> Result<(), ProviderError> {
        let credential = self.credential().await?;
        let url = format!(
            "{}/model-invocation-job/{}/stop",
            self.base_url,
            job_id_of(&batch.id)
        );
        let body = Bytes::from_static(b"{}");
        let sent = self
            .http
            .send("cancel batch", || {
                self.signed(&credential, Method::POST, &url, Some(&body))
            })
            .await;
        match sent {
            Ok(_) => Ok(()),
            // Already ended: nothing to stop.
            Err(ProviderError::Http {
                status: 400,
                message,
                ..
            }) if message.contains("ValidationException") => Ok(()),
            Err(error) => Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_fit_bedrocks_pattern_and_name_the_shard_attempt() {
        let key = |job: &str| ShardKey {
            job_id: job.into(),
            attempt: 2,
            shard: 13,
        };
        assert_eq!(
            job_name_prefix(&key("news_2026")),
            "rowsmith-news+2026.2.13-"
        );
        let long = job_name_prefix(&key(&"x".repeat(64)));
        assert!(long.len() + 13 <= 63, "{long}");
        assert!(long.ends_with(".2.13-"));
        for name in [job_name_prefix(&key("a-b_c")), long] {
            let name = format!("{name}1765152000000");
            assert!(name.len() <= 63);
            assert!(name.starts_with(|c: char| c.is_ascii_alphanumeric()));
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)),
                "{name}"
            );
        }
    }

    #[test]
    fn statuses_map_partial_completion_to_expiry_and_stop_to_cancel() {
        assert_eq!(state_of("Submitted"), BatchState::Validating);
        assert_eq!(state_of("Scheduled"), BatchState::InProgress);
        assert_eq!(state_of("PartiallyCompleted"), BatchState::Expired);
        assert_eq!(state_of("Stopped"), BatchState::Cancelled);
        assert_eq!(state_of("Stopping"), BatchState::Cancelling);
        assert_eq!(state_of("Paused"), BatchState::Other("Paused".into()));
        let job = Job {
            job_arn: "arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/abcdef123456"
                .into(),
            job_name: None,
            status: "Completed".into(),
            message: None,
            submit_time: None,
            input_data_config: Some(
                json!({"s3InputDataConfig": {"s3Uri": "s3://b/p/j/1.0.9/input.jsonl"}}),
            ),
            output_data_config: Some(
                json!({"s3OutputDataConfig": {"s3Uri": "s3://b/p/j/1.0.9/output/"}}),
            ),
            total_record_count: Some(3),
            success_record_count: Some(2),
            error_record_count: Some(1),
        };
        let status = job.to_status();
        assert_eq!(
            status.output_file_id.as_deref(),
            Some("s3://b/p/j/1.0.9/output/abcdef123456/input.jsonl.out")
        );
        assert_eq!((status.total, status.completed, status.failed), (3, 2, 1));
    }
}
