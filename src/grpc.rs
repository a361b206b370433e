//! The gRPC listeners: a unix socket (`<data-dir>/hoard.sock`, mode 0660: its file permissions
//! are its access control) and optionally TCP (`grpc_listen`; a token in the `authorization`
//! metadata when auth is on, TLS when a certificate is configured). Both serve containerd's
//! content, leases, introspection and version services and hoard's admin service, in the daemon's
//! process, and both drain on shutdown.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};

use crate::app::App;
use crate::auth::{Front, Need, Verdict};
use crate::containerd::{leases::LeasesService, Content, ContentService};
use crate::proto::{
    admin as admin_api, content as content_api, introspection, leases as leases_api, version,
};

/// gRPC's own default is 4 MiB; containerd's clients send 8 MiB writes in 16 MiB messages.
const MAX_MESSAGE: usize = 16 << 20;

/// Who may call: nobody is asked on the socket (its permissions decide); over TCP with auth on,
/// the `authorization` metadata must carry a token whose scopes cover the call.
#[derive(Clone)]
pub struct Gate {
    app: Arc<App>,
    tcp: bool,
}

impl Gate {
    pub fn check<T>(
        &self,
        req: &Request<T>,
        front: Front,
        name: Option<String>,
        action: u8,
    ) -> Result<(), Status> {
        self.check_scope(req, front, name, false, action)
    }

    /// `check`, for a request that acts on every name starting with `name` (a content request
    /// without a namespace acts on the whole view): a grant must cover them all.
    pub fn check_scope<T>(
        &self,
        req: &Request<T>,
        front: Front,
        name: Option<String>,
        prefix_query: bool,
        action: u8,
    ) -> Result<(), Status> {
        let Some(auth) = self.app.auth.as_ref().filter(|_| self.tcp) else {
            return Ok(());
        };
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let who = match auth.identify(header) {
            Ok(w) => w,
            Err(why) => {
                tracing::warn!(why = %why, "gRPC request refused");
                return Err(Status::unauthenticated(why));
            }
        };
        let need = Need {
            front,
            name,
            action,
            oci: false,
            prefix_query,
        };
        match auth.check(&who, &need) {
            Verdict::Allow => Ok(()),
            Verdict::Challenge { why, .. } => {
                tracing::warn!(why = %why, "gRPC request refused");
                crate::metrics::refused(front.as_str());
                Err(Status::unauthenticated(format!(
                    "{why}: send a token as 'authorization: Bearer <token>' metadata"
                )))
            }
            Verdict::Deny { why } => {
                tracing::warn!(why = %why, "gRPC request refused");
                crate::metrics::refused(front.as_str());
                Err(Status::permission_denied(why))
            }
        }
    }
}

/// Enough of containerd's introspection service for `ctr` and containerd clients.
pub struct Introspection {
    uuid: String,
    gate: Gate,
}

#[tonic::async_trait]
impl introspection::introspection_server::Introspection for Introspection {
    async fn plugins(
        &self,
        req: Request<introspection::PluginsRequest>,
    ) -> Result<Response<introspection::PluginsResponse>, Status> {
        self.gate
            .check(&req, Front::Content, None, crate::auth::READ)?;
        let plugin = |kind: &str, id: &str| introspection::Plugin {
            r#type: kind.into(),
            id: id.into(),
            ..Default::default()
        };
        Ok(Response::new(introspection::PluginsResponse {
            plugins: vec![
                plugin("io.containerd.content.v1", "content"),
                plugin("io.containerd.lease.v1", "manager"),
                plugin("io.containerd.grpc.v1", "content"),
                plugin("io.containerd.grpc.v1", "leases"),
                plugin("io.containerd.grpc.v1", "introspection"),
                plugin("io.containerd.grpc.v1", "version"),
            ],
        }))
    }

    async fn server(
        &self,
        req: Request<()>,
    ) -> Result<Response<introspection::ServerResponse>, Status> {
        self.gate
            .check(&req, Front::Content, None, crate::auth::READ)?;
        Ok(Response::new(introspection::ServerResponse {
            uuid: self.uuid.clone(),
            pid: std::process::id() as u64,
            pidns: 0,
        }))
    }
}

/// containerd's version service: hoard's version, so `ctr version` names what it talks to.
pub struct Version {
    gate: Gate,
}

#[tonic::async_trait]
impl version::version_server::Version for Version {
    async fn version(
        &self,
        req: Request<()>,
    ) -> Result<Response<version::VersionResponse>, Status> {
        self.gate
            .check(&req, Front::Content, None, crate::auth::READ)?;
        Ok(Response::new(version::VersionResponse {
            // Semantic, as clients that compare versions expect; the revision names hoard.
            version: format!("v{}", env!("CARGO_PKG_VERSION")),
            revision: "hoard".into(),
        }))
    }
}

/// A TLS connection as tonic takes it.
struct TlsIo(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl Connected for TlsIo {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// The socket path the configuration asks for (`None`: no socket).
pub fn socket_path(config: &crate::config::Config) -> Option<PathBuf> {
    match &config.grpc_socket {
        Some(p) if p.as_os_str() == "none" => None,
        Some(p) => Some(p.clone()),
        None => Some(config.data_dir.join("hoard.sock")),
    }
}

fn router(app: &Arc<App>, content: &Arc<Content>, tcp: bool) -> tonic::transport::server::Router {
    let gate = Gate {
        app: app.clone(),
        tcp,
    };
    let view = app.config.grpc_view.clone();
    let content_svc = content_api::content_server::ContentServer::new(ContentService {
        core: content.clone(),
        view: view.clone(),
        gate: gate.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE)
    .max_encoding_message_size(MAX_MESSAGE);
    let leases_svc = leases_api::leases_server::LeasesServer::new(LeasesService {
        core: content.clone(),
        view,
        gate: gate.clone(),
    });
    let uuid = {
        let d = crate::digest::Digest::sha256_of(app.data_dir().to_string_lossy().as_bytes());
        let h = d.hex();
        format!(
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    };
    let intro = introspection::introspection_server::IntrospectionServer::new(Introspection {
        uuid,
        gate: gate.clone(),
    });
    let version = version::version_server::VersionServer::new(Version { gate: gate.clone() });
    let admin = admin_api::admin_server::AdminServer::new(crate::admin::AdminService {
        app: app.clone(),
        gate,
    });
    tonic::transport::Server::builder()
        .add_service(content_svc)
        .add_service(leases_svc)
        .add_service(intro)
        .add_service(version)
        .add_service(admin)
}

/// Binds the socket, replacing a stale socket file (never another kind of file).
fn bind_socket(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            anyhow::bail!(
                "{} exists and is not a socket: refusing to replace it (set grpc_socket)",
                path.display()
            );
        }
        // The data directory's lock is held: no live hoard owns this socket.
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let l = tokio::net::UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("binding {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(l)
}

/// Starts the listeners; each task ends once `shutdown` fires and its calls drained.
pub fn serve(
    app: &Arc<App>,
    content: &Arc<Content>,
    tls: Option<Arc<crate::tls::Tls>>,
    tcp: Option<std::net::TcpListener>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    if let Some(path) = socket_path(&app.config) {
        let listener = bind_socket(&path)?;
        tracing::info!("gRPC on unix://{}", path.display());
        let incoming = UnixListenerStream::new(listener);
        let r = router(app, content, false);
        let stop = stopped(shutdown.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = r.serve_with_incoming_shutdown(incoming, stop).await {
                tracing::error!(error = %e, "gRPC socket server failed");
            }
            let _ = std::fs::remove_file(&path);
        }));
    }
    if let Some(l) = tcp {
        l.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(l)?;
        let addr = listener.local_addr()?;
        let r = router(app, content, true);
        let stop = stopped(shutdown.clone());
        match tls {
            None => {
                tracing::info!("gRPC on http://{addr}");
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = r.serve_with_incoming_shutdown(incoming, stop).await {
                        tracing::error!(error = %e, "gRPC TCP server failed");
                    }
                }));
            }
            Some(tls) => {
                tracing::info!("gRPC on https://{addr}");
                let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<TlsIo>>(16);
                let mut down = shutdown.clone();
                tokio::spawn(async move {
                    loop {
                        let accepted = tokio::select! {
                            r = listener.accept() => r,
                            _ = down.wait_for(|s| *s) => break,
                        };
                        let (sock, peer) = match accepted {
                            Ok(c) => c,
                            Err(e) => {
                                tracing::warn!(error = %e, "gRPC accept failed");
                                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                                continue;
                            }
                        };
                        let acceptor = tls.acceptor_h2();
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            let hs = tokio::time::timeout(
                                std::time::Duration::from_secs(10),
                                acceptor.accept(sock),
                            )
                            .await;
                            match hs {
                                Ok(Ok(s)) => {
                                    let _ = tx.send(Ok(TlsIo(s))).await;
                                }
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "gRPC TLS handshake failed")
                                }
                                Err(_) => tracing::debug!(%peer, "gRPC TLS handshake timed out"),
                            }
                        });
                    }
                });
                let incoming = ReceiverStream::new(rx);
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = r.serve_with_incoming_shutdown(incoming, stop).await {
                        tracing::error!(error = %e, "gRPC TLS server failed");
                    }
                }));
            }
        }
    }
    Ok(tasks)
}

/// A client channel to a hoard socket (`hoard admin`, tests).
pub async fn connect_socket(path: &Path) -> anyhow::Result<tonic::transport::Channel> {
    let path = path.to_owned();
    if !path.exists() {
        anyhow::bail!(
            "{} does not exist: is hoard serving with this data directory? (--socket names \
             another)",
            path.display()
        );
    }
    let ch = tonic::transport::Endpoint::try_from("http://hoard.sock")?
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await?;
    Ok(ch)
}
