//! Shared by the socket tests and the benchmark: certificates minted per run, a started
//! injector on 127.0.0.1:0, and a small HTTPS client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use palisade_injector::server::ServeConfig;
use palisade_injector::settings::RawSettings;
use palisade_injector::tls::CertFiles;
use palisade_testkit::pki::{Authority, Leaf};
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A serving certificate for `localhost` and 127.0.0.1, as the API server reaches a webhook.
pub fn serving_leaf(pki: &Authority) -> Leaf {
    pki.server_leaf(&["localhost", "127.0.0.1"])
}

pub fn write_leaf(dir: &Path, leaf: &Leaf) -> CertFiles {
    let files = CertFiles {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
    };
    write_atomically(&files.cert, &leaf.cert_pem);
    write_atomically(&files.key, &leaf.key_pem);
    files
}

/// Replaces a file the way a Secret volume does: the reader sees the old or the new, whole.
pub fn write_atomically(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

pub fn serve_config(files: CertFiles) -> ServeConfig {
    ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        cert_files: files,
        settings: RawSettings::default().validate().unwrap(),
        max_request_bytes: 64 * 1024,
        tls_reload_interval: Duration::from_millis(100),
        max_connections: 64,
        max_connections_per_source: 64,
    }
}

pub fn tls_connector(ca: &CertificateDer<'static>) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let config =
        rustls::ClientConfig::builder_with_provider(palisade_injector::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// One kept-alive HTTP/1.1 connection over TLS, as the API server holds them.
pub struct Client {
    sender: SendRequest<Full<Bytes>>,
    pub peer_cert: Vec<u8>,
}

impl Client {
    pub async fn connect(addr: SocketAddr, connector: &TlsConnector) -> Self {
        let tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        let peer_cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .unwrap_or_default();
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(connection);
        Self { sender, peer_cert }
    }

    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: impl Into<Bytes>,
    ) -> (StatusCode, Bytes) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "localhost")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body.into()))
            .unwrap();
        self.sender.ready().await.unwrap();
        let response = self.sender.send_request(request).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, body)
    }

    pub async fn post(&mut self, body: impl Into<Bytes>) -> (StatusCode, Bytes) {
        self.request("POST", "/mutate", body).await
    }
}

/// A Pod CREATE review as the API server sends it, for the pod of a small Deployment.
pub fn pod_review(uid: &str) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                         "groups": ["system:serviceaccounts", "system:authenticated"]},
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"generateName": "web-7d4b9c-", "namespace": "shop",
                             "labels": {"app": "web", "pod-template-hash": "7d4b9c"},
                             "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                 "name": "web-7d4b9c", "uid": "0b9c1c9e-1d0c-4c3e-9a1e-2f7e0d2a1b11",
                                 "controller": true, "blockOwnerDeletion": true}]},
                "spec": {
                    "containers": [{
                        "name": "web", "image": "nginx:1.27",
                        "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10},
                        "readinessProbe": {"tcpSocket": {"port": 8080}},
                        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                        "volumeMounts": [{"name": "kube-api-access-x", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}],
                        "terminationMessagePath": "/dev/termination-log",
                        "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent"
                    }],
                    "volumes": [{"name": "kube-api-access-x", "projected": {"sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}]}}],
                    "restartPolicy": "Always", "terminationGracePeriodSeconds": 30,
                    "dnsPolicy": "ClusterFirst", "serviceAccountName": "web",
                    "securityContext": {}, "schedulerName": "default-scheduler",
                    "enableServiceLinks": true, "preemptionPolicy": "PreemptLowerPriority"
                },
                "status": {}
            },
            "oldObject": null,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    })
}
