//! A minimal HTTP/1.1 load client over keep-alive loopback connections. It builds each
//! request into one buffer and parses only the status line and `Content-Length`, so the
//! client spends little of the two cores that the server under test needs; the host and
//! its bare baseline are driven by this same client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One keep-alive connection.
pub struct Connection {
    stream: TcpStream,
    /// The `Host` header: the address connected to, as a browser would send it (a host
    /// answers only names it knows for itself).
    host: String,
    buffer: Vec<u8>,
    request: Vec<u8>,
}

impl Connection {
    /// Connects to `address`.
    pub async fn open(address: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            host: address.to_string(),
            buffer: Vec::with_capacity(4096),
            request: Vec::with_capacity(4096),
        })
    }

    /// POSTs `body` to `path` with the given extra header lines (each ending in CRLF) and
    /// returns the response status.
    pub async fn post(
        &mut self,
        path: &str,
        headers: &str,
        content_type: &str,
        body: &[u8],
    ) -> anyhow::Result<u16> {
        self.send(path, headers, content_type, body).await?;
        self.read_response(None).await
    }

    /// [`Connection::post`], also copying the response's body into `answer` (replacing
    /// what it held).
    pub async fn post_answered(
        &mut self,
        path: &str,
        headers: &str,
        content_type: &str,
        body: &[u8],
        answer: &mut Vec<u8>,
    ) -> anyhow::Result<u16> {
        self.send(path, headers, content_type, body).await?;
        self.read_response(Some(answer)).await
    }

    async fn send(
        &mut self,
        path: &str,
        headers: &str,
        content_type: &str,
        body: &[u8],
    ) -> anyhow::Result<()> {
        self.request.clear();
        self.request.extend_from_slice(
            format!(
                "POST {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: {content_type}\r\n\
                 content-length: {}\r\n{headers}\r\n",
                self.host,
                body.len()
            )
            .as_bytes(),
        );
        self.request.extend_from_slice(body);
        self.stream.write_all(&self.request).await?;
        Ok(())
    }

    /// Reads one response and returns its status; its body goes into `answer` if given.
    async fn read_response(&mut self, answer: Option<&mut Vec<u8>>) -> anyhow::Result<u16> {
        let head_end = loop {
            if let Some(end) = find(&self.buffer, b"\r\n\r\n") {
                break end + 4;
            }
            self.fill().await?;
        };
        let head = std::str::from_utf8(&self.buffer[..head_end]).context("response head")?;
        let status: u16 = head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .context("status line")?;
        let length: usize = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0);
        while self.buffer.len() < head_end + length {
            self.fill().await?;
        }
        if let Some(answer) = answer {
            answer.clear();
            answer.extend_from_slice(&self.buffer[head_end..head_end + length]);
        }
        self.buffer.drain(..head_end + length);
        Ok(status)
    }

    async fn fill(&mut self) -> anyhow::Result<()> {
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("the server closed the connection");
        }
        self.buffer.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Posts `batches` batches of `size` empty events of type `ty` (ids `<prefix><b>-<i>`) in
/// batched mode, one after another; every answer must be `202`.
pub async fn post_batches(
    address: SocketAddr,
    ty: &str,
    prefix: &str,
    batches: usize,
    size: usize,
) -> anyhow::Result<()> {
    let mut connection = Connection::open(address).await?;
    for b in 0..batches {
        let body: Vec<serde_json::Value> = (0..size)
            .map(|i| {
                serde_json::json!({"specversion": "1.0", "id": format!("{prefix}{b}-{i}"),
                    "source": "/bench", "type": ty, "data": {}})
            })
            .collect();
        let status = connection
            .post(
                "/v1/events",
                "",
                "application/cloudevents-batch+json",
                &serde_json::to_vec(&body)?,
            )
            .await?;
        anyhow::ensure!(status == 202, "status {status}");
    }
    Ok(())
}

/// What one request of a load run is.
pub trait Request: Send + Sync + 'static {
    /// The `n`-th request: path, extra headers, content type, body.
    fn build(&self, n: usize) -> (String, String, &'static str, Vec<u8>);
    /// Events it carries.
    fn events(&self) -> usize;
    /// Whether [`paced_requests`] reads each answer's body and hands it to
    /// [`Request::check_answer`]; `false` (the default) leaves bodies uncopied.
    fn checks_answer(&self) -> bool {
        false
    }
    /// Checks the body of an answer that had the expected status; an error fails the run.
    fn check_answer(&self, _answer: &[u8]) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Single binary-mode events to `POST /v1/events/bench.tick`.
pub struct Single {
    /// Id prefix, unique per run so dedupe never hides work.
    pub prefix: String,
}

impl Request for Single {
    fn build(&self, n: usize) -> (String, String, &'static str, Vec<u8>) {
        (
            "/v1/events/bench.tick".to_owned(),
            format!("ce-id: {}-{n}\r\n", self.prefix),
            "application/json",
            format!("{{\"n\":{n}}}").into_bytes(),
        )
    }

    fn events(&self) -> usize {
        1
    }
}

/// Batches of `size` events in one `application/cloudevents-batch+json` request.
pub struct Batch {
    /// Id prefix, unique per run.
    pub prefix: String,
    /// Events per request.
    pub size: usize,
}

impl Request for Batch {
    fn build(&self, n: usize) -> (String, String, &'static str, Vec<u8>) {
        let mut body = String::with_capacity(self.size * 100);
        body.push('[');
        for i in 0..self.size {
            if i > 0 {
                body.push(',');
            }
            body.push_str(&format!(
                "{{\"specversion\":\"1.0\",\"id\":\"{}-{n}-{i}\",\"source\":\"/bench\",\
                 \"type\":\"bench.batch\",\"data\":{{\"i\":{i}}}}}",
                self.prefix
            ));
        }
        body.push(']');
        (
            "/v1/events".to_owned(),
            String::new(),
            "application/cloudevents-batch+json",
            body.into_bytes(),
        )
    }

    fn events(&self) -> usize {
        self.size
    }
}

/// What a [`saturate`] run did.
#[derive(Debug, Clone, Copy)]
pub struct Saturated {
    /// Events in the requests that were sent and answered `202`: fewer than asked for
    /// when the deadline stopped the run.
    pub events: usize,
    /// Those events per second, from the start to the last answer.
    pub per_second: f64,
}

/// Sends `requests` requests as fast as `connections` connections allow, stopping early at
/// `deadline`; every answer must be `202`. Returns the events sent and their rate, both
/// counting only requests that were answered.
pub async fn saturate(
    address: SocketAddr,
    connections: usize,
    requests: usize,
    deadline: Duration,
    request: Arc<dyn Request>,
) -> anyhow::Result<Saturated> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..connections {
        let request = Arc::clone(&request);
        tasks.push(tokio::spawn(async move {
            let mut connection = Connection::open(address).await?;
            let mut sent = 0usize;
            for n in (c..requests).step_by(connections) {
                if started.elapsed() > deadline {
                    break;
                }
                let (path, headers, content_type, body) = request.build(n);
                let status = connection
                    .post(&path, &headers, content_type, &body)
                    .await?;
                anyhow::ensure!(status == 202, "status {status}");
                sent += 1;
            }
            anyhow::Ok(sent)
        }));
    }
    let mut sent = 0;
    for task in tasks {
        sent += task.await??;
    }
    let events = sent * request.events();
    Ok(Saturated {
        events,
        per_second: events as f64 / started.elapsed().as_secs_f64(),
    })
}

/// Sends single events at a fixed offered rate for `duration` from `connections`
/// connections. Each request's latency runs from when it was due, not from when it went
/// out, so a stalled server cannot hide its queueing. Returns the latencies.
pub async fn paced(
    address: SocketAddr,
    connections: usize,
    rate: f64,
    duration: Duration,
    prefix: &str,
) -> anyhow::Result<Vec<Duration>> {
    let request = Arc::new(Single {
        prefix: prefix.to_owned(),
    });
    paced_requests(address, connections, rate, duration, request, 202).await
}

/// [`paced`] with any request, each answered `expect`.
pub async fn paced_requests(
    address: SocketAddr,
    connections: usize,
    rate: f64,
    duration: Duration,
    request: Arc<dyn Request>,
    expect: u16,
) -> anyhow::Result<Vec<Duration>> {
    let total = (rate * duration.as_secs_f64()) as usize;
    let interval = Duration::from_secs_f64(connections as f64 / rate);
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for c in 0..connections {
        let request = Arc::clone(&request);
        tasks.push(tokio::spawn(async move {
            let mut connection = Connection::open(address).await?;
            let mut latencies = Vec::new();
            let checks = request.checks_answer();
            let mut answer = Vec::new();
            // Stagger the connections across one interval.
            let offset = interval.mul_f64(c as f64 / connections as f64);
            for (k, n) in (c..total).step_by(connections).enumerate() {
                let due = started + offset + interval * u32::try_from(k)?;
                tokio::time::sleep_until(due).await;
                let (path, headers, content_type, body) = request.build(n);
                let status = if checks {
                    connection
                        .post_answered(&path, &headers, content_type, &body, &mut answer)
                        .await?
                } else {
                    connection
                        .post(&path, &headers, content_type, &body)
                        .await?
                };
                anyhow::ensure!(status == expect, "status {status}, expected {expect}");
                latencies.push(due.elapsed());
                if checks {
                    request
                        .check_answer(&answer)
                        .with_context(|| format!("request {n}"))?;
                }
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    for task in tasks {
        latencies.extend(task.await??);
    }
    Ok(latencies)
}
