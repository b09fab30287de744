//! The admin protocol, below both the admin socket and the services: JSON lines, one request
//! `{"cmd": "...", ...}` and one [`AdminResponse`] per connection (a streaming command sends
//! event lines first). Each service registers the commands it answers in [`AdminHandlers`]
//! and defines their request type itself; the socket only dispatches on `cmd`. The CLI's
//! side ([`call`], [`call_stream`]) lives here too, so both ends agree on the framing.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// A reload asked through the socket, answered with its outcome.
pub type ReloadRequest = tokio::sync::oneshot::Sender<Result<(), String>>;

/// The daemon's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminResponse {
    pub ok: bool,
    #[serde(default)]
    pub result: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl AdminResponse {
    /// The response for a handler's outcome.
    pub fn from_result(r: Result<serde_json::Value>) -> Self {
        match r {
            Ok(result) => Self {
                ok: true,
                result,
                error: None,
            },
            Err(e) => Self {
                ok: false,
                result: serde_json::Value::Null,
                error: Some(format!("{e:#}")),
            },
        }
    }
}

/// The future of a command's answer.
pub type Reply = Pin<Box<dyn Future<Output = Result<serde_json::Value>> + Send>>;
/// The future of a streaming command: it writes its event lines and its final response.
pub type StreamReply = Pin<Box<dyn Future<Output = Result<()>> + Send>>;

/// How one command is answered.
#[derive(Clone)]
pub enum Handler {
    /// One request, one response.
    Call(Arc<dyn Fn(serde_json::Value) -> Reply + Send + Sync>),
    /// The handler owns the connection: event lines, then the response line.
    Stream(
        Arc<dyn Fn(serde_json::Value, OwnedReadHalf, OwnedWriteHalf) -> StreamReply + Send + Sync>,
    ),
}

type StatusFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

#[derive(Default)]
struct Inner {
    handlers: HashMap<String, Handler>,
    status: BTreeMap<&'static str, StatusFn>,
}

/// Admin commands by name (`cmd`), registered by the services that answer them, and the
/// parts of `bastide status` they contribute.
#[derive(Clone, Default)]
pub struct AdminHandlers(Arc<RwLock<Inner>>);

fn parse<R: DeserializeOwned>(v: serde_json::Value) -> Result<R> {
    serde_json::from_value(v).map_err(|e| anyhow::anyhow!("malformed request: {e}"))
}

impl AdminHandlers {
    fn insert(&self, cmds: &[&str], h: Handler) {
        if let Ok(mut inner) = self.0.write() {
            for c in cmds {
                inner.handlers.insert((*c).to_string(), h.clone());
            }
        }
    }

    /// Answers `cmds` with `f`, given the request parsed as `R`.
    pub fn call<R, F, Fut>(&self, cmds: &[&str], f: F)
    where
        R: DeserializeOwned + Send + 'static,
        F: Fn(R) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<serde_json::Value>> + Send + 'static,
    {
        let f = Arc::new(f);
        self.insert(
            cmds,
            Handler::Call(Arc::new(move |v| {
                let f = f.clone();
                Box::pin(async move { f(parse(v)?).await })
            })),
        );
    }

    /// Answers `cmds` with `f` on a blocking thread (registry and file work).
    pub fn blocking<R, F>(&self, cmds: &[&str], f: F)
    where
        R: DeserializeOwned + Send + 'static,
        F: Fn(R) -> Result<serde_json::Value> + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        self.call(cmds, move |req: R| {
            let f = f.clone();
            async move {
                tokio::task::spawn_blocking(move || f(req))
                    .await
                    .context("admin task")?
            }
        });
    }

    /// Answers `cmds` by streaming on the connection.
    pub fn stream<R, F, Fut>(&self, cmds: &[&str], f: F)
    where
        R: DeserializeOwned + Send + 'static,
        F: Fn(R, OwnedReadHalf, OwnedWriteHalf) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        let f = Arc::new(f);
        self.insert(
            cmds,
            Handler::Stream(Arc::new(move |v, rd, mut wr| {
                let f = f.clone();
                Box::pin(async move {
                    match parse(v) {
                        Ok(req) => f(req, rd, wr).await,
                        Err(e) => send_line(&mut wr, &AdminResponse::from_result(Err(e))).await,
                    }
                })
            })),
        );
    }

    /// `cmds` belong to a service that is off: they answer `why`.
    pub fn off(&self, cmds: &[&str], why: &'static str) {
        self.call(cmds, move |_: serde_json::Value| async move {
            Err(anyhow::anyhow!(why))
        });
    }

    /// The handler of `cmd`.
    pub fn get(&self, cmd: &str) -> Option<Handler> {
        self.0.read().ok()?.handlers.get(cmd).cloned()
    }

    /// Adds `key` to `bastide status`, computed by `f` at each request.
    pub fn status(
        &self,
        key: &'static str,
        f: impl Fn() -> serde_json::Value + Send + Sync + 'static,
    ) {
        if let Ok(mut inner) = self.0.write() {
            inner.status.insert(key, Arc::new(f));
        }
    }

    /// The status parts services contribute.
    pub fn statuses(&self) -> Vec<(&'static str, serde_json::Value)> {
        let fs: Vec<(&'static str, StatusFn)> = match self.0.read() {
            Ok(inner) => inner.status.iter().map(|(k, f)| (*k, f.clone())).collect(),
            Err(_) => return Vec::new(),
        };
        fs.into_iter().map(|(k, f)| (k, f())).collect()
    }
}

/// Writes one JSON line.
pub async fn send_line(wr: &mut OwnedWriteHalf, v: &impl Serialize) -> Result<()> {
    let mut out = serde_json::to_vec(v)?;
    out.push(b'\n');
    wr.write_all(&out).await?;
    Ok(())
}

/// Connects to the daemon and sends one request line; the answer is read from the result.
async fn send_request(
    socket: &Path,
    req: &impl Serialize,
) -> Result<(BufReader<OwnedReadHalf>, OwnedWriteHalf)> {
    let stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "cannot reach the bastide daemon at {} (is it running?)",
            socket.display()
        )
    })?;
    let (rd, mut wr) = stream.into_split();
    send_line(&mut wr, req).await?;
    // The caller keeps the write half open until it has read the answer: dropping it sends
    // EOF, which the daemon may take for a client gone away.
    Ok((BufReader::new(rd), wr))
}

/// Sends one request to the daemon and returns its result, or its error as an `Err`.
pub async fn call(socket: &Path, req: &impl Serialize) -> Result<serde_json::Value> {
    let fut = async {
        let (mut reader, _wr) = send_request(socket, req).await?;
        let mut resp = String::new();
        reader.read_line(&mut resp).await?;
        if resp.is_empty() {
            bail!("the daemon closed the connection without answering");
        }
        let resp: AdminResponse =
            serde_json::from_str(&resp).context("malformed answer from the daemon")?;
        if resp.ok {
            Ok(resp.result)
        } else {
            bail!("{}", resp.error.unwrap_or_else(|| "request failed".into()))
        }
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .context("the daemon did not answer within 5s")?
}

/// Sends a streaming request: calls `each` with every event line's JSON, returns the final
/// result.
pub async fn call_stream(
    socket: &Path,
    req: &impl Serialize,
    mut each: impl FnMut(serde_json::Value) -> Result<()>,
) -> Result<serde_json::Value> {
    let (mut reader, _wr) = send_request(socket, req).await?;
    loop {
        let mut resp = String::new();
        if reader.read_line(&mut resp).await? == 0 {
            bail!("the daemon closed the connection without answering");
        }
        let v: serde_json::Value =
            serde_json::from_str(&resp).context("malformed answer from the daemon")?;
        if v.get("ok").is_some() {
            let resp: AdminResponse = serde_json::from_value(v)?;
            return if resp.ok {
                Ok(resp.result)
            } else {
                bail!("{}", resp.error.unwrap_or_else(|| "request failed".into()))
            };
        }
        each(v)?;
    }
}
