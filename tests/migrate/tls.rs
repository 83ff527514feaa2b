//! TLS (`tls`): a migration over TLS, certificates from another CA refused in
//! both directions, the page server requiring client certificates.

use std::net::TcpListener;
use std::thread;
use std::time::Duration;

use page_pipe::image::{PageFlags, PagemapEntry};
use page_pipe::migrate::{
    MemoryRegion, MigrateErrorKind, MigrateOptions, Phase, ReceiveOptions, ReceiveReport, Sender,
    receive,
};
use page_pipe::page_server::{Incoming, PageServerClient};
use page_pipe::tls::{TlsClientConfig, TlsError, TlsIdentity, TlsServerConfig, TlsStream};
use page_pipe_tests::{alone, open_fds};

use super::{BASE, Running, anon, pages_differ, ps, threads, tracker};

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
}

/// A CA and a server ("localhost", 127.0.0.1) and a client certificate it signed, made
/// now.
fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        ca_pem: ca.pem(),
        server: leaf(vec!["localhost".into(), "127.0.0.1".into()]),
        client: leaf(vec!["migration-client".into()]),
    }
}

fn server_cfg(p: &Pki, client_ca: &str) -> TlsServerConfig {
    let id = TlsIdentity::from_pem(p.server.0.as_bytes(), p.server.1.as_bytes()).unwrap();
    TlsServerConfig::new(client_ca.as_bytes(), id).unwrap()
}

fn client_cfg(p: &Pki, server_ca: &str) -> TlsClientConfig {
    let id = TlsIdentity::from_pem(p.client.0.as_bytes(), p.client.1.as_bytes()).unwrap();
    TlsClientConfig::new(server_ca.as_bytes(), id, "localhost").unwrap()
}

/// A TLS receiver on a loopback listener, on a thread.
type TlsReceived = thread::JoinHandle<Result<(MemoryRegion, ReceiveReport), String>>;

fn tls_receiver(pages: usize, cfg: TlsServerConfig) -> (std::net::SocketAddr, TlsReceived) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = thread::spawn(move || {
        let tcp = l.accept().unwrap().0;
        let s = TlsStream::accept(tcp, &cfg, None).map_err(|e| format!("accept: {e:?}"))?;
        let mut dest = MemoryRegion::from_mmap(BASE, anon(pages)).unwrap();
        let r = receive(Incoming::from_tls(s), &mut dest, &ReceiveOptions::default())
            .map_err(|e| format!("receive: {e:?}"))?;
        Ok((dest, r))
    });
    (addr, h)
}

/// Over TLS, both ends authenticated, a migration with writers running ends equal, and
/// the tunnels' threads and sockets are gone after.
#[test]
fn a_migration_over_tls_ends_equal() {
    if !alone("tls::a_migration_over_tls_ends_equal") {
        return;
    }
    let pages = 2048;
    let (t0, f0) = (threads(), open_fds());
    let r = Running::new(pages, 1, Duration::from_micros(20));
    let Some(mut t) = tracker(&r, "tls::a_migration_over_tls_ends_equal") else {
        return;
    };
    let p = pki();
    let (addr, h) = tls_receiver(pages, server_cfg(&p, &p.ca_pem));
    let sender = Sender::connect_tls(addr, &client_cfg(&p, &p.ca_pem), None).unwrap();
    let report = sender
        .run(
            &r.source(),
            &mut t,
            || r.pause(),
            || r.resume(),
            &MigrateOptions::default(),
        )
        .unwrap();
    let (dest, got) = h.join().unwrap().unwrap();
    assert_eq!(got.rounds.len(), report.rounds.len());
    assert_eq!(pages_differ(&r.mem, &dest.mmap().unwrap()[..]), 0);
    drop(r.finish());
    drop((t, dest));
    assert_eq!((threads(), open_fds()), (t0, f0));
}

/// A client that trusts another CA refuses the receiver's certificate.
#[test]
fn tls_refuses_a_server_certificate_from_another_ca() {
    let (p, other) = (pki(), pki());
    let (addr, h) = tls_receiver(8, server_cfg(&p, &p.ca_pem));
    let e = Sender::connect_tls(addr, &client_cfg(&p, &other.ca_pem), None).unwrap_err();
    let MigrateErrorKind::Connect(c) = &e.kind else {
        panic!("{e:?}")
    };
    let page_pipe::page_server::ClientError::Tls { error } = c.as_ref() else {
        panic!("{c:?}")
    };
    assert!(
        matches!(
            error,
            TlsError::Tls {
                error: rustls::Error::InvalidCertificate(_),
                ..
            }
        ),
        "{error:?}"
    );
    assert!(h.join().unwrap().is_err(), "the receiver got no migration");
}

/// A receiver that trusts another CA for clients refuses the sender's certificate; the
/// sender fails in connecting, not later.
#[test]
fn tls_refuses_a_client_certificate_from_another_ca() {
    let (p, other) = (pki(), pki());
    let (addr, h) = tls_receiver(8, server_cfg(&p, &other.ca_pem));
    let e = Sender::connect_tls(addr, &client_cfg(&p, &p.ca_pem), None).unwrap_err();
    assert_eq!(e.phase, Phase::Connect, "{e:?}");
    assert!(matches!(e.kind, MigrateErrorKind::Connect(_)), "{e:?}");
    let served = h.join().unwrap().unwrap_err();
    assert!(served.starts_with("accept"), "{served}");
    assert!(
        served.contains("Certificate") || served.contains("certificate"),
        "{served}"
    );
}

/// The page server with TLS: a client with a certificate the CA signed writes its image;
/// a plain TCP client is refused in the handshake, and the server goes on serving.
#[test]
fn the_page_server_over_tls_takes_authenticated_clients_only() {
    use page_pipe::page_server::{PageServer, ServerConfig};
    let p = pki();
    let dir = page_pipe_tests::TempDir::new("migrate-ps-tls");
    let config = ServerConfig {
        sync: false,
        idle_timeout: Some(Duration::from_secs(5)),
        ..ServerConfig::new(dir.path())
    };
    let server = PageServer::bind("127.0.0.1:0", config)
        .unwrap()
        .with_tls(server_cfg(&p, &p.ca_pem));
    let addr = server.local_addr().unwrap();
    let plain = thread::spawn(move || {
        // A client that speaks no TLS: its OPEN2 is no ClientHello.
        PageServerClient::connect(addr, 1).map(|_| ())
    });
    let refused = server.accept().unwrap_err();
    assert!(
        matches!(refused, page_pipe::page_server::ServerError::Tls { .. }),
        "{refused:?}"
    );
    assert!(plain.join().unwrap().is_err());
    let cfg = client_cfg(&p, &p.ca_pem);
    let client = thread::spawn(move || {
        let mut c = PageServerClient::connect_tls(addr, &cfg, 7)?;
        c.send_entry(
            PagemapEntry {
                vaddr: BASE,
                pages: 2,
                flags: PageFlags::PRESENT,
            },
            &vec![9u8; 2 * ps()],
        )?;
        c.close()
    });
    let incoming = server.accept().expect("the TLS client is accepted");
    let report = server.serve(incoming).unwrap();
    client.join().unwrap().unwrap();
    assert_eq!(report.images.len(), 1);
    let mut back = vec![0u8; 2 * ps()];
    page_pipe::image::Image::open_id(dir.path(), 7)
        .unwrap()
        .read(BASE, &mut back)
        .unwrap();
    assert!(back.iter().all(|&b| b == 9));
}
