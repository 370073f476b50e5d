#!/usr/bin/env python3
"""Writes the variant of containers/kubernetes/smtp-tls-proxy.yaml that `.ci/containers`
plays with podman 4.3, changing only what podman cannot run as written:

- Secret volume -> hostPath of a directory the test fills with kubelet's atomic-writer layout
  (`..<timestamp>/`, `..data` -> it, `tls.crt` -> `..data/tls.crt`): podman 4.3's kube play
  panics on secret volumes (nil pointer in VolumeFromSecret), and the rotation test needs the
  `..data` swap a kubelet does anyway.
- replicas -> 1: podman plays every replica as a pod publishing the same host ports.
- every containerPort gets hostIP 127.0.0.1 and a free hostPort: podman publishes each
  containerPort on the host (on all addresses, same port number); Kubernetes publishes none.
- names get a "ci-" prefix (Deployment, ConfigMap): podman keeps a ConfigMap as a volume of
  that name after `kube down`, and CI must not touch a user's objects of the shipped names.
- --no-capability: capabilities.add removed from the proxy (drop ALL stays), to prove the
  pod's sysctl alone lets it bind 25/465/587.

Everything else (securityContext, sysctls, probes, config, env, mounts) is kept as shipped.
The Service is kept too; podman ignores that kind (the test's PROXY v2 balancer stands in).
Prints the pod-level sysctls as name=value lines on stdout (podman 4.3 ignores them; the
test applies them to the pod's network namespace before the containers start, as a CRI does).
"""
import argparse
import sys

import yaml


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("manifest")
    ap.add_argument("out")
    ap.add_argument("--secret-dir", required=True)
    ap.add_argument("--host-port", action="append", default=[], help="containerPort=hostPort")
    ap.add_argument("--no-capability", action="store_true")
    args = ap.parse_args()
    host_ports = dict(p.split("=") for p in args.host_port)

    with open(args.manifest) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    kinds = sorted(d["kind"] for d in docs)
    if kinds != ["ConfigMap", "Deployment", "Service"]:
        sys.exit(f"kube-variant: unexpected kinds {kinds}")
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    dep = next(d for d in docs if d["kind"] == "Deployment")
    old_cm = cm["metadata"]["name"]
    cm["metadata"]["name"] = "ci-" + old_cm
    dep["metadata"]["name"] = "ci-" + dep["metadata"]["name"]
    dep["spec"]["replicas"] = 1
    pod = dep["spec"]["template"]["spec"]

    secret_volumes = 0
    for v in pod["volumes"]:
        if "secret" in v:
            v.pop("secret")
            v["hostPath"] = {"path": args.secret_dir, "type": "Directory"}
            secret_volumes += 1
        if "configMap" in v and v["configMap"]["name"] == old_cm:
            v["configMap"]["name"] = cm["metadata"]["name"]
    if secret_volumes != 1:
        sys.exit(f"kube-variant: expected one secret volume, found {secret_volumes}")

    proxy = None
    for c in pod["containers"]:
        for p in c.get("ports", []):
            port = str(p["containerPort"])
            if port not in host_ports:
                sys.exit(f"kube-variant: no --host-port for containerPort {port}")
            p["hostIP"] = "127.0.0.1"
            p["hostPort"] = int(host_ports[port])
        if c["name"] == "smtp-tls-proxy":
            proxy = c
    if proxy is None:
        sys.exit("kube-variant: no smtp-tls-proxy container")
    caps = proxy["securityContext"]["capabilities"]
    if caps.get("drop") != ["ALL"] or caps.get("add") != ["NET_BIND_SERVICE"]:
        sys.exit(f"kube-variant: the proxy's capabilities changed: {caps}")
    if args.no_capability:
        del caps["add"]

    with open(args.out, "w") as f:
        yaml.safe_dump_all(docs, f, sort_keys=False)
    for s in (pod.get("securityContext") or {}).get("sysctls", []):
        print(f"{s['name']}={s['value']}")


if __name__ == "__main__":
    main()
