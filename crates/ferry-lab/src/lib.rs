//! `ferry lab`: a Kubernetes-like cluster of network namespaces on one host, `ferry demo`, and
//! `ferry bench`, all in the `ferry-lab` binary ([`app`]), which `ferry` runs for them.
//!
//! Modules: [`state`] (paths, lab.json, lock), [`sys`] (iproute2, namespaces, processes),
//! [`topology`] (LAN, nodes, client, agents, down), [`pods`], [`manifests`] (apply/delete,
//! EndpointSlices), [`get`], [`serve`] (the pods' server), [`cli`], [`show`], [`seed`],
//! [`demo`], [`probe`] (the client's curl loop), [`failover`] and [`bench`] (benchmarks), and
//! [`api`] (the [`Lab`] handle for end-to-end tests); [`workloads`] reads the kinds the lab
//! runs itself (Deployment, Pod).
//!
//! A lab brought up with `--api` ([`LabConfig::api`], `$FERRY_LAB_API`) takes a cluster's path
//! instead of the manifest directory: [`cluster`] runs the lab API server (ferry-apiserver, a
//! test double of kube-apiserver) and registers the Nodes, the agents run with `--kubeconfig`,
//! [`runtime`] plays kubelet, Deployment and EndpointSlice controllers, and [`client`] makes
//! `ferry lab apply/delete/get/set-ready` go through the API (`kubectl --kubeconfig "$(ferry lab
//! kubeconfig)"` works the same).

pub mod api;
pub mod app;
pub mod bench;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod demo;
pub mod failover;
pub mod firstpacket;
pub mod get;
pub mod manifests;
pub mod ops;
pub mod pods;
pub mod probe;
pub mod router;
pub mod runtime;
pub mod seed;
pub mod serve;
pub mod show;
pub mod state;
pub mod sys;
pub mod topology;
pub mod workloads;

pub use api::{ci, require_root, skip, Lab, LabConfig};
pub use cli::{run_lab, LabArgs, LabCommand};
pub use demo::{run_demo, DemoArgs};
pub use state::{LabState, NodeInfo, PodInfo};
