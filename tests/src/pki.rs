//! A throwaway certificate authority made with the `openssl` command line: a CA and leaf
//! certificates for loopback servers (and clients), for tests of TLS to the registry and of mTLS.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A CA in a directory; every certificate it issues lives beside it.
pub struct Pki {
    dir: PathBuf,
}

/// A leaf certificate and its key (PEM files).
#[derive(Clone, Debug)]
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    /// A new CA (EC P-256, valid one day) named `name`, in `dir`.
    pub fn new(dir: &Path, name: &str) -> Pki {
        let pki = Pki { dir: dir.to_owned() };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            path(&pki.ca_key()),
            "-out",
            path(&pki.ca()),
        ]);
        pki
    }

    /// The CA certificate (PEM), what a client trusts.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    /// A leaf for `name` with the subject alternative names `sans` (e.g. `IP:127.0.0.1`,
    /// `DNS:localhost`, `URI:spiffe://...`), usable for servers and clients.
    pub fn issue(&self, name: &str, sans: &[&str]) -> Leaf {
        self.issue_valid(name, sans, Validity::OneDay)
    }

    /// Like [`Pki::issue`], but valid only on 2020-01-01: expired. (`openssl x509 -days` cannot
    /// go back in time and `-not_after` needs OpenSSL 3.4: `openssl ca` with a throwaway
    /// database sets both dates.)
    pub fn issue_expired(&self, name: &str, sans: &[&str]) -> Leaf {
        self.issue_valid(name, sans, Validity::Expired)
    }

    fn issue_valid(&self, name: &str, sans: &[&str], validity: Validity) -> Leaf {
        let key = self.dir.join(format!("{name}.key"));
        let csr = self.dir.join(format!("{name}.csr"));
        let cert = self.dir.join(format!("{name}.pem"));
        let ext = self.dir.join(format!("{name}.ext"));
        std::fs::write(
            &ext,
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName={}\n",
                sans.join(",")
            ),
        )
        .expect("write extensions");
        openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            path(&key),
            "-out",
            path(&csr),
        ]);
        match validity {
            Validity::OneDay => openssl(&[
                "x509",
                "-req",
                "-in",
                path(&csr),
                "-CA",
                path(&self.ca()),
                "-CAkey",
                path(&self.ca_key()),
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                path(&ext),
                "-out",
                path(&cert),
            ]),
            Validity::Expired => {
                let db = self.dir.join(format!("{name}.ca-db"));
                std::fs::create_dir_all(&db).expect("create the CA database dir");
                std::fs::write(db.join("index.txt"), "").expect("write index.txt");
                let conf = db.join("ca.cnf");
                std::fs::write(
                    &conf,
                    format!(
                        "[ca]\ndefault_ca = d\n[d]\ndatabase = {db}/index.txt\nnew_certs_dir = {db}\n\
                         serial = {db}/serial\ndefault_md = sha256\npolicy = p\nunique_subject = no\n\
                         [p]\ncommonName = supplied\n",
                        db = db.display()
                    ),
                )
                .expect("write ca.cnf");
                openssl(&[
                    "ca",
                    "-batch",
                    "-notext",
                    "-rand_serial",
                    "-config",
                    path(&conf),
                    "-cert",
                    path(&self.ca()),
                    "-keyfile",
                    path(&self.ca_key()),
                    "-in",
                    path(&csr),
                    "-startdate",
                    "20200101000000Z",
                    "-enddate",
                    "20200102000000Z",
                    "-extfile",
                    path(&ext),
                    "-out",
                    path(&cert),
                ]);
            }
        }
        Leaf { cert, key }
    }
}

enum Validity {
    OneDay,
    Expired,
}

impl Leaf {
    /// The certificate's serial number as `openssl x509 -serial` prints it (upper-case hex).
    pub fn serial(&self) -> String {
        let out = Command::new("openssl")
            .args(["x509", "-noout", "-serial", "-in", path(&self.cert)])
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl x509 -serial: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .trim_start_matches("serial=")
            .to_owned()
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl").args(args).output().expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `openssl s_client` to `addr` with `args`, sending one HTTP/1.0 request (the server closes
/// after its answer, or at once without material): what it printed, stdout then stderr, after
/// at most 20 s.
pub fn s_client<S: AsRef<std::ffi::OsStr>>(addr: SocketAddr, args: &[S]) -> String {
    let mut child = Command::new(crate::tools::require("openssl"))
        .args(["s_client", "-connect", &addr.to_string(), "-ign_eof"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run openssl s_client");
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"GET /s-client HTTP/1.0\r\nHost: test\r\n\r\n");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait().expect("wait for s_client").is_some() || Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("s_client output");
            return format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The serial of the first certificate `openssl s_client -showcerts` printed, if any.
pub fn leaf_serial(out: &str) -> Option<String> {
    let begin = out.find("-----BEGIN CERTIFICATE-----")?;
    let end = out[begin..].find("-----END CERTIFICATE-----")? + begin + "-----END CERTIFICATE-----".len();
    let mut child = Command::new(crate::tools::require("openssl"))
        .args(["x509", "-noout", "-serial"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(&out.as_bytes()[begin..end]).ok()?;
    let o = child.wait_with_output().ok()?;
    Some(
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .trim_start_matches("serial=")
            .to_owned(),
    )
}
