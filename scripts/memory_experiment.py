#!/usr/bin/env python3
"""The advancer's RSS at scale (docs/benchmarks.md, "Memory at 10^6 regions"): one
`streamhelper sim` (REGIONS, default 10^6, over 20 stores, flushing every 5 s) and each
advancer build in turn against it, each with a fresh task whose start is a minute back, its
VmRSS/VmHWM sampled every 5 s: SUBSCRIBED seconds (40) with flush subscriptions, then with
them off (every tick polls what lags); POLL_FIRST=1 the other way round. THRESHOLD is the
advancer's --try-advance-threshold (6000ms). Writes each build's log and final smaps to OUT
(default /tmp/streamhelper-memory).

usage: memory_experiment.py SIM_BIN SECONDS NAME=BIN[,ENV=VALUE...][,heaptrack]...
"""
import os, subprocess, sys, time, re, signal, urllib.request
sim_bin, dur = sys.argv[1], float(sys.argv[2]); variants = sys.argv[3:]
regions = int(os.environ.get("REGIONS", "1000000"))
SUBSCRIBED = float(os.environ.get("SUBSCRIBED", "40"))
THRESHOLD = os.environ.get("THRESHOLD", "6000ms")
POLL_FIRST = os.environ.get("POLL_FIRST") == "1"
out = os.environ.get("OUT", "/tmp/streamhelper-memory")
d = out + "/run"; os.makedirs(d, exist_ok=True)
ctl = d + "/control"; open(ctl, "w").close()
sim = subprocess.Popen([sim_bin, "sim", "--stores", "20", "--regions", str(regions), "--flush-interval", "5000ms",
    "--control-file", ctl, "--duration", "1h"], stdout=subprocess.PIPE, stderr=open(d + "/sim.log", "w"), text=True)
pd = etcd = None
stores = []
for line in sim.stdout:
    line = line.strip()
    if line.startswith("store "): stores.append(line[6:].split(":")[0])
    if line.startswith("pd: "): pd = line[4:]
    if line.startswith("etcd: "): etcd = line[6:]
    if line == "ready": break
print("sim ready", pd, etcd, flush=True)
import threading
threading.Thread(target=lambda: [None for _ in sim.stdout], daemon=True).start()
def subscriptions(state):
    with open(ctl, "a") as f:
        for st in stores:
            f.write(f"subscription {st} {state}\n")
            if state == "off": f.write(f"reset-subscriptions {st}\n")
def new_task(n):
    if n > 0:
        subprocess.run([sim_bin, "task", "delete", f"t{n-1}", "-u", pd, "--etcd", etcd], check=True, stdout=subprocess.DEVNULL)
    ts = int((time.time() - 60) * 1000) << 18
    subprocess.run([sim_bin, "task", "add", f"t{n}", "--storage", f"local://{d}/storage{n}", "--start-ts", str(ts),
        "-u", pd, "--etcd", etcd], check=True, stdout=subprocess.DEVNULL)
    return ts
def status(pid):
    out = {}
    for l in open(f"/proc/{pid}/status"):
        k, _, v = l.partition(":")
        if k in ("VmRSS", "VmHWM", "Threads"): out[k] = v.split()[0]
    return out
def metric(port, name):
    try:
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except Exception: return None
    for l in page.splitlines():
        if l.startswith(name): return float(l.split()[-1])
    return None
port = 19400
for n, v in enumerate(variants):
    start_ts = new_task(n)
    name, _, rest = v.partition("=")
    parts = rest.split(",")
    binp, env, heap = parts[0], dict(os.environ), False
    for p in parts[1:]:
        if p == "heaptrack": heap = True
        else: k, _, val = p.partition("="); env[k] = val
    port += 1
    cmd = [binp, "advancer", "-u", pd, "--etcd", etcd, "--status-addr", f"127.0.0.1:{port}", "--tick-interval", "2000ms",
           "--try-advance-threshold", THRESHOLD]
    if heap: cmd = ["heaptrack", "-o", f"{out}/heaptrack.{name}"] + cmd
    adv = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(f"{out}/{name}.log", "w"))
    time.sleep(1)
    pid = adv.pid
    if heap:
        # heaptrack forks the real process
        children = subprocess.run(["pgrep", "-P", str(adv.pid)], capture_output=True, text=True).stdout.split()
        pid = int(children[-1]) if children else adv.pid
    began = time.time(); covered = None; last_cp = None; phase = "sub"
    if POLL_FIRST:
        subscriptions("off"); phase = "poll"
    while time.time() - began < dur:
        if not POLL_FIRST and phase == "sub" and time.time() - began > SUBSCRIBED:
            subscriptions("off"); phase = "poll"
        if POLL_FIRST and phase == "poll" and time.time() - began > SUBSCRIBED:
            subscriptions("on"); phase = "sub"
        cp = metric(port, f'tidb_log_backup_last_checkpoint{{task="t{n}"}}')
        if cp and cp > start_ts and covered is None: covered = time.time() - began
        s = status(pid)
        polls = subprocess.run(f"grep -o 'collected checkpoints of [0-9]* regions' {out}/{name}.log | awk '{{print $4}}' | tail -3 | tr '\\n' ' '", shell=True, capture_output=True, text=True).stdout
        print(f"{name} {phase} t={time.time()-began:5.0f}s rss={int(s['VmRSS'])//1024}MiB hwm={int(s['VmHWM'])//1024}MiB thr={s['Threads']} covered={covered} load={open('/proc/loadavg').read().split()[0]} polls=[{polls}]", flush=True)
        time.sleep(5)
    subprocess.run(f"cat /proc/{pid}/smaps_rollup > {out}/{name}.smaps_rollup; cat /proc/{pid}/smaps > {out}/{name}.smaps", shell=True)
    subscriptions("on")
    os.kill(pid, signal.SIGTERM)
    try: adv.wait(60)
    except Exception: adv.kill()
    time.sleep(2)
    print("sim alive:", sim.poll() is None, flush=True)
with open(ctl, "a") as f: f.write("quit\n")
try: sim.wait(60)
except Exception: sim.kill()
