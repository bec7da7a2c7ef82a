//! A CRI client, as the kubelet is one: the `k8s-cri` crate's generated
//! v1 clients over containerd's gRPC socket, each call bounded by
//! [`CALL_BOUND`]. Synchronous for the tests: a current-thread tokio
//! runtime of its own runs each call.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatsRequest, ContainerStatus,
    ContainerStatusRequest, CreateContainerRequest, DnsConfig, ExecSyncRequest, ImageSpec,
    ImageStatusRequest, KeyValue, Mount, PodSandboxConfig, PodSandboxMetadata, PodSandboxState,
    PodSandboxStatusRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
    StopPodSandboxRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

/// A CRI call that takes longer has hung (a nested guest boots in seconds).
pub const CALL_BOUND: Duration = Duration::from_secs(240);

/// A connection to a CRI server.
#[derive(Debug)]
pub struct Cri {
    runtime: tokio::runtime::Runtime,
    service: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

/// What `ExecSync` gave back.
#[derive(Debug)]
pub struct Exec {
    /// What the command wrote on stdout.
    pub stdout: String,
    /// What it wrote on stderr.
    pub stderr: String,
    /// Its exit code.
    pub exit_code: i32,
}

impl Cri {
    /// Connects to the CRI server on the Unix socket `socket`.
    pub fn connect(socket: &Path) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let socket = socket.to_owned();
        let channel = runtime
            .block_on(async {
                // The URI is required but unused: the connector dials the socket.
                Endpoint::try_from("http://[::]:0")
                    .expect("a constant URI")
                    .connect_timeout(Duration::from_secs(10))
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let socket: PathBuf = socket.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(socket).await?;
                            Ok::<_, std::io::Error>(TokioIo::new(stream))
                        }
                    }))
                    .await
            })
            .expect("connect to containerd's CRI socket");
        Self {
            runtime,
            service: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        }
    }

    /// Runs `call` to its end within [`CALL_BOUND`]; panics with `what`
    /// and the status if it fails or hangs.
    fn call<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> T {
        self.try_call(what, call)
            .unwrap_or_else(|status| panic!("CRI {what}: {status}"))
    }

    /// Like [`Cri::call`], but a refused call is returned.
    fn try_call<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        // The timer is made inside the runtime, which drives it.
        match self
            .runtime
            .block_on(async { tokio::time::timeout(CALL_BOUND, call).await })
        {
            Ok(answer) => answer.map(tonic::Response::into_inner),
            Err(_) => panic!("CRI {what} hung for {CALL_BOUND:?}"),
        }
    }

    /// Whether the image `name` is there (CRI sees what was imported).
    pub fn has_image(&self, name: &str) -> bool {
        let mut images = self.images.clone();
        let status = self.call(
            "ImageStatus",
            images.image_status(ImageStatusRequest {
                image: Some(image(name)),
                verbose: false,
            }),
        );
        status.image.is_some()
    }

    /// Runs a pod under runtime `handler` (empty: the default runtime) with
    /// `dns` as its DNS settings; returns its id.
    pub fn run_pod(&self, name: &str, handler: &str, dns: Option<DnsConfig>) -> String {
        let mut service = self.service.clone();
        self.call(
            "RunPodSandbox",
            service.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(pod_config(name, dns)),
                runtime_handler: handler.to_owned(),
            }),
        )
        .pod_sandbox_id
    }

    /// The pod's IP address and whether it is ready.
    pub fn pod_ip(&self, pod: &str) -> (String, bool) {
        let mut service = self.service.clone();
        let status = self
            .call(
                "PodSandboxStatus",
                service.pod_sandbox_status(PodSandboxStatusRequest {
                    pod_sandbox_id: pod.to_owned(),
                    verbose: false,
                }),
            )
            .status
            .expect("a pod's status");
        let ip = status.network.map(|n| n.ip).unwrap_or_default();
        (ip, status.state == PodSandboxState::SandboxReady as i32)
    }

    /// Creates and starts a container of `pod` (named `name`, running
    /// `command` in `image_name`); returns its id.
    pub fn start_container(
        &self,
        pod: &str,
        pod_name: &str,
        name: &str,
        image_name: &str,
        command: &[&str],
    ) -> String {
        self.start_container_with(pod, pod_name, name, image_name, command, &[])
    }

    /// [`Cri::start_container`] with the volumes the kubelet would give
    /// it: (host directory or file, path in the container, read-only).
    pub fn start_container_with(
        &self,
        pod: &str,
        pod_name: &str,
        name: &str,
        image_name: &str,
        command: &[&str],
        volumes: &[(&Path, &str, bool)],
    ) -> String {
        let mut service = self.service.clone();
        let id = self
            .call(
                "CreateContainer",
                service.create_container(CreateContainerRequest {
                    pod_sandbox_id: pod.to_owned(),
                    config: Some(ContainerConfig {
                        metadata: Some(ContainerMetadata {
                            name: name.to_owned(),
                            attempt: 0,
                        }),
                        image: Some(image(image_name)),
                        command: command.iter().map(|&c| c.to_owned()).collect(),
                        envs: vec![KeyValue {
                            key: "CAPSID_TEST".into(),
                            value: name.to_owned(),
                        }],
                        mounts: volumes
                            .iter()
                            .map(|(host, container, readonly)| Mount {
                                container_path: (*container).to_owned(),
                                host_path: host.display().to_string(),
                                readonly: *readonly,
                                ..Mount::default()
                            })
                            .collect(),
                        ..ContainerConfig::default()
                    }),
                    sandbox_config: Some(pod_config(pod_name, None)),
                }),
            )
            .container_id;
        self.call(
            "StartContainer",
            service.start_container(StartContainerRequest {
                container_id: id.clone(),
            }),
        );
        id
    }

    /// Runs `cmd` in container `id` and waits for it (its own timeout is
    /// `timeout_secs`).
    pub fn exec(&self, id: &str, cmd: &[&str], timeout_secs: i64) -> Exec {
        let mut service = self.service.clone();
        let answer = self.call(
            "ExecSync",
            service.exec_sync(ExecSyncRequest {
                container_id: id.to_owned(),
                cmd: cmd.iter().map(|&c| c.to_owned()).collect(),
                timeout: timeout_secs,
            }),
        );
        Exec {
            stdout: String::from_utf8_lossy(&answer.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&answer.stderr).into_owned(),
            exit_code: answer.exit_code,
        }
    }

    /// Container `id`'s status.
    pub fn container_status(&self, id: &str) -> ContainerStatus {
        let mut service = self.service.clone();
        self.call(
            "ContainerStatus",
            service.container_status(ContainerStatusRequest {
                container_id: id.to_owned(),
                verbose: false,
            }),
        )
        .status
        .expect("a container's status")
    }

    /// Whether container `id` is running.
    pub fn is_running(&self, id: &str) -> bool {
        self.container_status(id).state == ContainerState::ContainerRunning as i32
    }

    /// Container `id`'s CPU time (ns) and working set (bytes), from its stats.
    pub fn container_stats(&self, id: &str) -> (u64, u64) {
        let mut service = self.service.clone();
        let stats = self
            .call(
                "ContainerStats",
                service.container_stats(ContainerStatsRequest {
                    container_id: id.to_owned(),
                }),
            )
            .stats
            .expect("a container's stats");
        let cpu = stats
            .cpu
            .and_then(|c| c.usage_core_nano_seconds)
            .map_or(0, |v| v.value);
        let memory = stats
            .memory
            .and_then(|m| m.working_set_bytes)
            .map_or(0, |v| v.value);
        (cpu, memory)
    }

    /// Stops and removes pod `id` with its containers; both calls are
    /// made, and the first refusal is returned.
    fn try_remove_pod(&self, id: &str) -> Result<(), tonic::Status> {
        let mut service = self.service.clone();
        let stopped = self.try_call(
            "StopPodSandbox",
            service.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.to_owned(),
            }),
        );
        let removed = self.try_call(
            "RemovePodSandbox",
            service.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.to_owned(),
            }),
        );
        stopped.and(removed).map(|_| ())
    }

    /// Stops and removes pod `id` with its containers, if it is still
    /// there; what fails is only printed (for clean-up after a failure).
    pub fn remove_pod_quietly(&self, id: &str) {
        if let Err(e) = self.try_remove_pod(id) {
            eprintln!("clean-up of pod {id}: {e}");
        }
    }

    /// Stops and removes pod `id` with its containers.
    pub fn remove_pod(&self, id: &str) {
        if let Err(status) = self.try_remove_pod(id) {
            panic!("CRI StopPodSandbox/RemovePodSandbox of {id}: {status}");
        }
    }
}

fn image(name: &str) -> ImageSpec {
    ImageSpec {
        image: name.to_owned(),
        ..ImageSpec::default()
    }
}

/// A pod's configuration as the kubelet sends it, minus what the tests do
/// not need (log directory, port mappings, security context).
fn pod_config(name: &str, dns: Option<DnsConfig>) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_owned(),
            uid: format!("uid-{name}"),
            namespace: "capsid-e2e".into(),
            attempt: 0,
        }),
        hostname: name.to_owned(),
        dns_config: dns,
        labels: HashMap::from([("app".to_owned(), name.to_owned())]),
        ..PodSandboxConfig::default()
    }
}
