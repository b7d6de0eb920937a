//! Real `nats-server -js` processes for the distributed-mode tests: free loopback ports,
//! a temporary store directory each, and kill/restart on the same port and store.
//! `scripts/setup.sh` installs the pinned server.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// One `nats-server` with JetStream, alone or as a node of a [`NatsCluster`].
pub struct NatsServer {
    child: Option<Child>,
    store: tempfile::TempDir,
    port: u16,
    cluster: Option<(String, u16, Vec<u16>)>,
    name: String,
}

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The pinned `nats-server` that `scripts/setup.sh` installs into the project's
/// `.tools/`, or the one `SWITCHYARD_NATS_SERVER` names.
fn binary() -> PathBuf {
    match std::env::var_os("SWITCHYARD_NATS_SERVER") {
        Some(path) => PathBuf::from(path),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/nats-server"),
    }
}

impl NatsServer {
    /// Starts a single JetStream server on a free loopback port.
    pub fn start() -> Self {
        let mut server = Self {
            child: None,
            store: tempfile::tempdir().unwrap(),
            port: free_port(),
            cluster: None,
            name: "solo".to_owned(),
        };
        server.run();
        server
    }

    /// The client URL, such as `nats://127.0.0.1:4222`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn run(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut command = Command::new(binary());
        command
            .args(["-js", "-a", "127.0.0.1", "-n", &self.name])
            .args(["-p", &self.port.to_string()])
            .arg("-sd")
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((cluster_name, cluster_port, peers)) = &self.cluster {
            let routes: Vec<String> = peers
                .iter()
                .map(|port| format!("nats://127.0.0.1:{port}"))
                .collect();
            command
                .args(["--cluster_name", cluster_name])
                .args(["--cluster", &format!("nats://127.0.0.1:{cluster_port}")])
                .args(["--routes", &routes.join(",")]);
        }
        let child = command.spawn().unwrap_or_else(|error| {
            panic!(
                "cannot start {} ({error}); scripts/setup.sh installs it",
                binary().display()
            )
        });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on port {} within 20s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs the server; its store stays for [`NatsServer::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Starts the server again on the same port and store.
    pub fn restart(&mut self) {
        self.run();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A three-node JetStream cluster on loopback.
pub struct NatsCluster {
    /// The nodes.
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts three nodes routed to each other and waits until JetStream has a leader.
    pub fn start() -> Self {
        let cluster_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let nodes = (0..3)
            .map(|index| {
                let peers = cluster_ports
                    .iter()
                    .enumerate()
                    .filter(|(peer, _)| *peer != index)
                    .map(|(_, port)| *port)
                    .collect();
                let mut node = NatsServer {
                    child: None,
                    store: tempfile::tempdir().unwrap(),
                    port: free_port(),
                    cluster: Some(("switchyard-test".to_owned(), cluster_ports[index], peers)),
                    name: format!("node-{index}"),
                };
                node.run();
                node
            })
            .collect();
        Self { nodes }
    }

    /// Every node's client URL, comma-separated, as the host's `url` takes them.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A loopback link to a server that passes what the server sends in pieces of `piece`
/// bytes with a pause after each, as a slow or congested network does; what the client
/// sends passes at once.
pub struct SlowLink {
    port: u16,
    closed: Arc<AtomicBool>,
}

impl SlowLink {
    /// Starts listening on a free loopback port, linking each connection to
    /// `server_port`.
    pub fn to(server_port: u16, piece: usize, pause: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let closed = Arc::new(AtomicBool::new(false));
        let closing = Arc::clone(&closed);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if closing.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", server_port)) else {
                    continue;
                };
                let (mut to_server, mut from_client) =
                    (server.try_clone().unwrap(), client.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from_client, &mut to_server);
                    let _ = to_server.shutdown(Shutdown::Write);
                });
                let (mut from_server, mut to_client) = (server, client);
                std::thread::spawn(move || {
                    let mut buffer = vec![0; piece];
                    while let Ok(read) = from_server.read(&mut buffer) {
                        if read == 0 || to_client.write_all(&buffer[..read]).is_err() {
                            break;
                        }
                        std::thread::sleep(pause);
                    }
                    let _ = to_client.shutdown(Shutdown::Both);
                });
            }
        });
        Self { port, closed }
    }

    /// The client URL of the link.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        // Wakes the accepting thread, which then sees it is closed.
        self.closed.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
