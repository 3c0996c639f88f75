"""The official Kubernetes Python client against ferry-apiserver (run by tests/python_client.rs).

Usage: python_client.py KUBECONFIG
Prints one JSON object with what it saw; exits non-zero on a failed check.
"""
import json
import sys
import threading

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

config.load_kube_config(sys.argv[1])
v1 = client.CoreV1Api()
out = {}

# A list with a label selector returns the items and a resourceVersion.
for name, app in [("py-a", "py"), ("py-b", "py"), ("other", "x")]:
    v1.create_namespaced_service("default", {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {"ports": [{"port": 80}]},
    })
lst = v1.list_namespaced_service("default", label_selector="app=py")
out["list_names"] = sorted(s.metadata.name for s in lst.items)
out["list_rv"] = lst.metadata.resource_version
try:
    v1.create_namespaced_service("default", {"metadata": {"name": "py-a"}, "spec": {}})
    out["duplicate"] = "created"
except ApiException as e:
    out["duplicate"] = e.status

# A change after the list, and one while watching: the watch from the list's
# resourceVersion gets both, and bookmarks.
v1.patch_namespaced_service("py-a", "default", {"metadata": {"labels": {"step": "1"}}})
timer = threading.Timer(
    0.5, lambda: v1.patch_namespaced_service("py-b", "default", {"metadata": {"labels": {"step": "2"}}}))
timer.start()
events = []
w = watch.Watch()
for ev in w.stream(v1.list_namespaced_service, "default", label_selector="app=py",
                   resource_version=out["list_rv"], allow_watch_bookmarks=True, timeout_seconds=2):
    if ev["type"] == "BOOKMARK":
        events.append(["BOOKMARK", ev["raw_object"]["metadata"]["resourceVersion"]])
    else:
        events.append([ev["type"], ev["object"].metadata.name, ev["object"].metadata.resource_version])
timer.join()
out["events"] = events
out["watch_rv"] = w.resource_version

# A watch from a resourceVersion older than the history gets 410 Expired.
try:
    for ev in watch.Watch().stream(v1.list_namespaced_service, "default", resource_version="1",
                                   timeout_seconds=2):
        out.setdefault("expired_events", []).append(ev["type"])
    out["expired"] = "no error"
except ApiException as e:
    out["expired"] = [e.status, e.reason]

print(json.dumps(out))
