//! A **test double of kube-apiserver** for ferry's lab — not a product, not a Kubernetes API
//! server anyone should run a cluster on.
//!
//! No real kube-apiserver can run on the lab machine, so the lab gets this small in-process
//! server that behaves like the real one *for the calls real clients make*: plain HTTP on
//! loopback, JSON only. Its tests drive it with the real clients: kubectl 1.32, the official
//! Python client, and kube-rs 5 (ferry's own).
//!
//! What it does:
//! - Discovery: `/api`, `/api/v1`, `/apis`, `/apis/<group>`, `/apis/<group>/<version>`
//!   (APIResourceLists with verbs, namespaced, kind, shortNames and `*/status`), `/version`.
//! - Resources (see [`resources::RESOURCES`]): v1 namespaces, nodes, services, endpoints,
//!   configmaps, pods, secrets, events; discovery.k8s.io/v1 endpointslices; apps/v1
//!   deployments; coordination.k8s.io/v1 leases; events.k8s.io/v1 events; metallb.io/v1beta1
//!   ipaddresspools, l2advertisements, bgpadvertisements, communities, bfdprofiles;
//!   metallb.io/v1beta2 bgppeers.
//! - One global, monotonically increasing resourceVersion; `uid`, `creationTimestamp`,
//!   `generation` (grows when anything outside metadata and status changes).
//! - List (always with `metadata.resourceVersion`; `labelSelector` with `=`, `==`, `!=`, `in`,
//!   `notin`, exists, `!`exists; `fieldSelector` `=`/`!=` on any dotted path, e.g.
//!   `metadata.name`), get, create (409 AlreadyExists, `generateName`), update (409 Conflict on
//!   a stale resourceVersion, none means unconditional), delete (returns the object;
//!   `preconditions.resourceVersion` honoured).
//! - Services are defaulted and allocated as kube-apiserver does it (IPv4 only): `type`,
//!   port `protocol` and `targetPort`, `sessionAffinity`, traffic policies, IP families; a
//!   cluster IP from the service CIDR (default 10.43.0.0/16, K3s's; first free address above
//!   the static band, where the real server picks at random) and node ports for NodePort and
//!   LoadBalancer Services (30000-32767); explicit values are honoured when in range and free
//!   (422 Invalid otherwise); an update that leaves them out keeps them; the cluster IP is
//!   immutable. Deleting a Service frees what it held.
//! - The `/status` subresource: status writes change only `status`, main writes ignore it;
//!   `status` is dropped on create (except Nodes), Namespaces get `status.phase: Active`.
//! - The `/scale` subresource of Deployments (autoscaling/v1 Scale, `kubectl scale`): GET,
//!   PUT and PATCH; a write sets `spec.replicas`.
//! - PATCH: `json-patch+json`, `merge-patch+json`, `strategic-merge-patch+json` (built-in kinds
//!   only, as the real server; merge keys for Service `ports` by `port`, containers, `env`,
//!   `volumes` by `name`, container `ports` by `containerPort`, `conditions` by `type`, ...;
//!   `$patch`, `$setElementOrder`, `$retainKeys`, `$deleteFromPrimitiveList`), and
//!   `apply-patch+yaml` answered as *create, or merge into the existing object* (see below).
//! - Watch: `?watch=true&resourceVersion=N&allowWatchBookmarks=true&timeoutSeconds=S`,
//!   newline-delimited JSON events ADDED/MODIFIED/DELETED/BOOKMARK; a resourceVersion older
//!   than the bounded history gives HTTP 200 and one `ERROR` event with Status 410 Expired;
//!   `resourceVersion` 0 or absent starts with synthetic ADDED events for what exists; an
//!   object leaving a selector is sent as DELETED, one entering it as ADDED.
//! - `meta.k8s.io/v1` Tables when the client asks for them (`kubectl get`, also on watches):
//!   Services show TYPE, CLUSTER-IP, EXTERNAL-IP (`<pending>` until `status.loadBalancer` has
//!   an address), PORT(S); Leases HOLDER; Events, Pods, EndpointSlices, Deployments and Nodes
//!   their usual columns; other kinds NAME and AGE.
//! - A minimal `/openapi/v3` (PATCH operations with their group/version/kind and the
//!   `fieldValidation` parameter, no schemas), so kubectl leaves validation to the server and
//!   `kubectl apply -f` needs no `--validate=false`; kubectl then builds strategic merge
//!   patches from its compiled-in types.
//! - Events: core/v1 and events.k8s.io/v1 share one storage (kube-apiserver's field
//!   renames: `involvedObject`/`regarding`, `message`/`note`, ...), so what kube-rs's
//!   `Recorder` writes shows in `kubectl get events`.
//! - Namespaces: `default`, `kube-system`, `kube-public` and `kube-node-lease` exist from the
//!   start; creating in a missing namespace is 404 (as the NamespaceLifecycle admission
//!   plugin); deleting a namespace deletes what is in it at once (no Terminating phase).
//! - Errors are `kind: Status` objects with kube-apiserver's codes and reasons.
//!
//! - RBAC, on request ([`authz`]): with RBAC objects and tokens (`--authorize FILE --token
//!   TOKEN=USER`), requests bearing a token are authorized as kube-apiserver's RBAC
//!   authorizer does for resource requests (403 Forbidden otherwise, 401 for an unknown
//!   token), and every access is recorded at `/debug/ferry/authz`; requests without a token
//!   are the administrator's. This proves the ClusterRole in `deploy/`.
//!
//! What it does **not** do: TLS, authentication beyond those tokens, admission other than the
//! namespace rule (nothing is validated beyond names, kinds, apiVersions and the Service
//! fields above), defaulting of any other kind (Pods, Deployments, ... are stored as sent),
//! IPv6 and dual-stack Services, finalizers and graceful deletion,
//! garbage collection, controllers of any kind, pagination (`limit`/`continue` are ignored:
//! a list is always complete), `deletecollection`, `dryRun` (refused with 400), field
//! validation (`fieldValidation=Strict` is accepted and unknown fields are kept), protobuf,
//! OpenAPI schemas and `/openapi/v2` (`kubectl explain` does not work), WatchList
//! (`sendInitialEvents`), field managers and apply conflicts (server-side apply is *create,
//! or strategic/JSON merge into the existing object*: fields dropped from the applied
//! manifest stay, and nothing conflicts — so lease libraries built on server-side apply
//! conflicts, such as kube-lease-manager, are not safe against it), and conversion between
//! versions other than Events'. Watchers that fall too far behind (4096
//! events) are disconnected, as a real server may do; clients re-watch. State lives in
//! memory, and is lost when the process ends unless `--state FILE` ([`Config::state`]) is
//! given: then every write saves all objects to that file (fine at lab scale, slow for
//! thousands of objects) and a restarted server loads them, with their resourceVersions; the
//! watch history is not kept, so watches from before the restart get 410 and clients list
//! again.
//!
//! Use: the `ferry-apiserver --listen 127.0.0.1:PORT --kubeconfig-out PATH` binary, or in
//! process [`Running::start`] (its own thread and tokio runtime; [`Running::write_kubeconfig`]),
//! or [`serve`] on a listener of your own. Then `kubectl --kubeconfig PATH ...`.

pub mod authz;
pub mod error;
pub mod events;
pub mod patch;
pub mod resources;
pub mod selector;
pub mod server;
pub mod service;
pub mod store;
pub mod table;

pub use error::ApiError;
pub use server::{kubeconfig, serve, ApiServer, Config, Running};
pub use store::Store;
