//! Synthetic probes through the gateway's policy chain, asked for by `ktctl doctor`.
//!
//! Each prompt goes to the gateway's OpenAI-compatible endpoint like a user's request, with the
//! gateway's probe token in `x-kt-synthetic` so the gateway marks its decision event and leaves
//! it out of its counters, and `max_tokens: 1` so an allowed probe costs the provider next to
//! nothing. The token is read for each probe: the gateway writes a new one at every start.

use std::time::{Duration, Instant};

use kt_proto::v1::{ProbeOutcome, ProbeRequest, ProbeResult};
use serde_json::{Value, json};

/// How long one probe request may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bodies read from the gateway are small; anything longer is cut.
const MAX_BODY: usize = 64 * 1024;

#[derive(Clone, Debug)]
pub struct Prober {
    client: reqwest::Client,
    /// `http://host:port` of the gateway's API.
    api_base: String,
    probe_token_file: Option<std::path::PathBuf>,
}

impl Prober {
    pub fn new(
        api_base: String,
        probe_token_file: Option<std::path::PathBuf>,
    ) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder().timeout(PROBE_TIMEOUT).build()?;
        Ok(Prober {
            client,
            api_base,
            probe_token_file,
        })
    }

    /// Sends every prompt of `request`; never fails, problems are in the result.
    pub async fn run(&self, request: ProbeRequest) -> ProbeResult {
        let mut result = ProbeResult {
            probe_id: request.probe_id,
            ..Default::default()
        };
        let token = match &self.probe_token_file {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(token) => Some(token.trim().to_owned()),
                Err(error) => {
                    result.error =
                        format!("cannot read the probe token {}: {error}", path.display());
                    return result;
                }
            },
            None => None,
        };
        let model = match self.first_model().await {
            Ok(model) => model,
            Err(error) => {
                result.error = error;
                return result;
            }
        };
        for prompt in request.prompts {
            let mut outcome = self.send(&model, &prompt.text, token.as_deref()).await;
            outcome.name = prompt.name;
            result.outcomes.push(outcome);
        }
        result
    }

    /// The first model the gateway serves: a probe must name one its routes accept.
    async fn first_model(&self) -> Result<String, String> {
        let url = format!("{}/v1/models", self.api_base);
        let response = self
            .client
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        let body: Value = read_json(response)
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        body["data"]
            .as_array()
            .and_then(|models| models.first())
            .and_then(|m| m["id"].as_str())
            .map(str::to_owned)
            .ok_or_else(|| format!("GET {url}: the gateway lists no model to probe"))
    }

    async fn send(&self, model: &str, text: &str, token: Option<&str>) -> ProbeOutcome {
        let url = format!("{}/v1/chat/completions", self.api_base);
        let body = json!({
            "model": model,
            "max_tokens": 1,
            "messages": [{ "role": "user", "content": text }],
        });
        let started = Instant::now();
        let mut post = self.client.post(&url).json(&body);
        if let Some(token) = token {
            post = post.header("x-kt-synthetic", token);
        }
        let sent = post.send().await;
        let mut outcome = ProbeOutcome::default();
        match sent {
            Ok(response) => {
                outcome.http_status = u32::from(response.status().as_u16());
                outcome.verdict = response
                    .headers()
                    .get("x-kt-verdict")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
                    // A gateway that does not say: the contract's 409 means blocked.
                    .unwrap_or_else(|| {
                        if outcome.http_status == 409 {
                            "block".into()
                        } else {
                            String::new()
                        }
                    });
                if let Ok(body) = read_json(response).await {
                    outcome.reason_code = body["error"]["reason_code"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                }
            }
            Err(error) => outcome.error = format!("POST {url}: {error}"),
        }
        outcome.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        outcome
    }
}

async fn read_json(mut response: reqwest::Response) -> Result<Value, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_BODY {
            return Err(format!("answer larger than {MAX_BODY} bytes"));
        }
    }
    serde_json::from_slice(&body).map_err(|e| format!("answer is not JSON: {e}"))
}

/// `http://host:port` of a URL: where the gateway's API lives when only its health URL is known.
pub fn origin(url: &str) -> Option<String> {
    let origin = reqwest::Url::parse(url).ok()?.origin();
    origin.is_tuple().then(|| origin.ascii_serialization())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_keeps_scheme_host_and_port() {
        assert_eq!(
            origin("http://127.0.0.1:41002/health").as_deref(),
            Some("http://127.0.0.1:41002")
        );
        assert_eq!(
            origin("https://gw.internal/x/health").as_deref(),
            Some("https://gw.internal")
        );
        assert_eq!(
            origin("http://[::1]:8080/health").as_deref(),
            Some("http://[::1]:8080")
        );
        assert_eq!(origin("not a url"), None);
    }
}
