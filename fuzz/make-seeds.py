#!/usr/bin/env python3
"""Writes the committed seed corpora (fuzz/seeds/<target>/). Rerun after changing it."""
import os, struct

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")

def put(target, name, data):
    d = os.path.join(root, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())

# --- smtp_session: first byte = read size / 7, then the client's bytes.
ok = ("EHLO web01\r\nMAIL FROM:<root@web01> SIZE=100\r\nRCPT TO:<ops@example.org>\r\n"
      "DATA\r\nSubject: hi\r\nFrom: root@web01\r\n\r\n..dot\r\nbody\r\n.\r\nQUIT\r\n")
put("smtp_session", "simple", b"\xff" + ok.encode())
put("smtp_session", "bytewise", b"\x00" + ok.encode())
put("smtp_session", "pipelined", b"\x10" + (
    "EHLO a\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<root>\r\n"
    "RCPT TO:<postmaster>\r\nDATA\r\nx\r\n.\r\nRSET\r\nMAIL FROM:<>\r\nRCPT TO:<c@example.net>\r\n"
    "DATA\r\n.\r\nQUIT\r\n").encode())
put("smtp_session", "smuggle-lf", b"\x40" + (
    "HELO a\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
    "x\n.\nMAIL FROM:<evil@example.org>\nRCPT TO:<v@example.org>\nDATA\nsmuggled\n.\n"
    "y\r\n.\r\n").encode())
put("smtp_session", "smuggle-cr", b"\x40" + (
    "HELO a\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
    "x\r.\rMAIL FROM:<e@example.org>\r\r\n.\r\n").encode())
put("smtp_session", "errors", b"\x03" + (
    "MAIL FROM:<a@b>\r\nFOO\r\nVRFY root\r\nEXPN x\r\nSTARTTLS\r\nAUTH PLAIN AAAA\r\nBDAT 10 LAST\r\n"
    "HELO\r\nEHLO " + "a" * 3000 + "\r\nLHLO x\r\nMAIL FROM:<a@b> BODY=BINARYMIME\r\n"
    "MAIL FROM:<a@b> SIZE=999999999999\r\nHELP\r\nNOOP\r\nQUIT\r\n").encode())
put("smtp_session", "long-line", b"\x80" + (
    "HELO a\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n" + "y" * 500 +
    "\r\n.\r\n").encode())
put("smtp_session", "too-many-rcpts", b"\x20" + (
    "EHLO a\r\nMAIL FROM:<a@example.org>\r\n" +
    "".join(f"RCPT TO:<r{i}@example.org>\r\n" for i in range(8)) + "RCPT TO:<x@evil.test>\r\nDATA\r\n.\r\n").encode())

# --- config: TOML files.
base = 'project = "p"\nzone = "p.example.org."\nstate_dir = "/nonexistent"\n'
put("config", "minimal", base)
put("config", "all", base + '''
[agents]
listen = "0.0.0.0:4443"
heartbeat_interval = "10s"
heartbeat_timeout = "5s"
[admin]
socket = "/run/bastide/admin.sock"
mode = 0o644
[dns]
listen = ["10.0.0.1:53"]
upstreams = ["9.9.9.9:53"]
allow = ["10.0.0.0/8", "bad"]
reverse_zones = ["10.in-addr.arpa."]
[[dns.records]]
name = "www"
type = "CNAME"
value = "web01"
[[dns.records]]
name = "@"
type = "MX"
value = "10 mail"
[[dns.records]]
name = "_x._tcp"
type = "SRV"
value = "0 5 443 web01"
[[dns.records]]
name = "t"
type = "TXT"
value = "hello"
[smtp]
listen = "10.0.0.1:25"
allow = ["10.0.0.0/24", "nope/99"]
sender_address = "vm@example.org"
admin_address = "bad address"
[smtp.relay]
host = "smtp.example.org"
username = "u"
tls = "none"
[ssh]
listen = "0.0.0.0:22"
audit_log = "/var/log/bastide/ssh.log"
[[ssh.admins]]
name = "alice"
keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHtlFkDaDSwC2VsKj2yxzgyhDiZbsNrbjzCtr0rRwc3D a@b", "cert-authority,principals=\\"alice,root\\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHtlFkDaDSwC2VsKj2yxzgyhDiZbsNrbjzCtr0rRwc3D ca"]
groups = ["ops"]
[[ssh.rules]]
groups = ["ops"]
agents = ["web*"]
labels = { env = "prod" }
cidrs = ["10.0.0.0/8"]
hosts = ["*.internal"]
ports = [22, 0]
[metrics]
listen = "127.0.0.1:9469"
allow = ["127.0.0.0/8"]
stale_after = "5m"
''')
put("config", "unknown-key", base + "[smtp]\nlisten = \"1.2.3.4:25\"\nbogus = 1\n")

# --- agent_register: protobuf RegisterRequest.
def varint(n):
    out = b""
    while True:
        b = n & 0x7f
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])

def field(num, data):
    if isinstance(data, str):
        data = data.encode()
    return varint(num << 3 | 2) + varint(len(data)) + data

def fixed64(num, val):
    return varint(num << 3 | 1) + struct.pack("<d", val)

key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHtlFkDaDSwC2VsKj2yxzgyhDiZbsNrbjzCtr0rRwc3D root@web01"
put("agent_register", "normal", field(1, "web01") + field(2, "web01.example.org") + field(3, "10.0.0.5")
    + field(3, "fd00::5") + field(4, "Debian 12") + field(5, "0.1.0") + field(6, key))
put("agent_register", "hostile", field(1, "db01") + field(2, "a\nb\x1b[31m" * 50) + field(3, "0.0.0.0")
    + field(3, "224.0.0.1") + field(3, "::ffff:10.0.0.1") + field(3, "not an ip") + field(3, "")
    + field(4, "\u202e" * 300) + field(6, key + "\nssh-rsa AAAA") + field(6, "ssh-ed25519 AAAA") + field(6, ""))
put("agent_register", "empty", b"")

# --- agent_session: AgentMessage.
def sample(labels, value):
    return b"".join(field(1, field(1, k) + field(2, v)) for k, v in labels) + fixed64(2, value)

fam = lambda name, typ, samples: field(1, name) + field(2, "help \\ text\n") + varint(3 << 3) + varint(typ) + b"".join(field(4, s) for s in samples)
batch = varint(1 << 3) + varint(1700000000000) + field(2, fam("node_load1", 2, [sample([], 0.5)])) \
    + field(2, fam("node_cpu_seconds_total", 1, [sample([("cpu", "0"), ("mode", "idle")], 1e9), sample([("cpu", "1"), ("mode", 'a"b\\c\nd')], float("nan"))])) \
    + field(2, fam("bad name", 2, [sample([], 1)])) + field(2, fam("x", 2, [sample([("agent", "spoof"), ("__name__", "y"), ("9bad", "z")], float("inf"))])) \
    + field(2, fam("node_load1", 2, [sample([], -0.0)]))
put("agent_session", "metrics", field(2, batch))
put("agent_session", "heartbeat", field(1, varint(1 << 3) + varint(2**64 - 1) + varint(2 << 3) + varint(2**63)))
put("agent_session", "empty-kind", b"")

# --- dns_query: flags byte, query, optional "\xff\xfe\xfd" + upstream reply.
def name(n):
    out = b""
    for l in n.strip(".").split("."):
        if l:
            out += bytes([len(l)]) + l.encode()
    return out + b"\x00"

def query(qid, n, qtype, edns=None, flags=0x0100, qclass=1):
    q = struct.pack(">HHHHHH", qid, flags, 1, 0, 0, 1 if edns else 0) + name(n) + struct.pack(">HH", qtype, qclass)
    if edns:
        q += b"\x00" + struct.pack(">HHIH", 41, edns, 0, 0)
    return q

def answer(qid, n, qtype, rdatas, rcode=0, ttl=300):
    h = struct.pack(">HHHHHH", qid, 0x8180 | rcode, 1, len(rdatas), 0, 0) + name(n) + struct.pack(">HH", qtype, 1)
    for rd in rdatas:
        h += b"\xc0\x0c" + struct.pack(">HHIH", qtype, 1, ttl, len(rd)) + rd
    return h

SEP = b"\xff\xfe\xfd"
put("dns_query", "zone-a", b"\x00" + query(1, "web01.fuzz.test", 1))
put("dns_query", "zone-aaaa-tcp", b"\x01" + query(2, "web01.fuzz.test", 28))
put("dns_query", "zone-mx-edns", b"\x00" + query(3, "fuzz.test", 15, edns=4096))
put("dns_query", "zone-txt", b"\x00" + query(4, "txt.fuzz.test", 16))
put("dns_query", "zone-cname", b"\x00" + query(5, "www.fuzz.test", 1))
put("dns_query", "zone-nx", b"\x00" + query(6, "nope.fuzz.test", 1))
put("dns_query", "zone-soa-ns", b"\x00" + query(7, "fuzz.test", 6))
put("dns_query", "reverse", b"\x00" + query(8, "5.0.0.10.in-addr.arpa", 12))
put("dns_query", "refused-src", b"\x02" + query(9, "web01.fuzz.test", 1))
put("dns_query", "axfr", b"\x01" + query(10, "fuzz.test", 252))
put("dns_query", "any", b"\x00" + query(11, "example.org", 255))
put("dns_query", "chaos", b"\x00" + query(12, "version.bind", 16, qclass=3))
put("dns_query", "notify", b"\x00" + query(13, "fuzz.test", 6, flags=0x2000))
put("dns_query", "forward-big", b"\x00" + query(14, "big.example.org", 1) + SEP +
    answer(14, "big.example.org", 1, [bytes([198, 51, 100, i]) for i in range(60)]))
put("dns_query", "forward-nx", b"\x00" + query(15, "nx.example.org", 1) + SEP + answer(15, "nx.example.org", 1, [], rcode=3))
put("dns_query", "forward-garbage", b"\x00" + query(16, "g.example.org", 1) + SEP + b"\x00\x10garbage")
put("dns_query", "forward-ttl0", b"\x00" + query(17, "t.example.org", 1, edns=512) + SEP + answer(17, "t.example.org", 1, [b"\x01\x02\x03\x04"], ttl=0))
put("dns_query", "header-only", b"\x00" + struct.pack(">HHHHHH", 18, 0x0100, 0, 0, 0, 0))
put("dns_query", "two-questions", b"\x00" + struct.pack(">HHHHHH", 19, 0x0100, 2, 0, 0, 0) + name("a.fuzz.test") + b"\x00\x01\x00\x01" + name("b.fuzz.test") + b"\x00\x01\x00\x01")
put("dns_query", "edns-v1", b"\x00" + query(20, "fuzz.test", 1)[:-0] + b"")

# --- spool_decode: .msg files, whole and torn.
msg = ("Bastide-Spool: 1\nId: 0006123456789a0b1c2d3e4f\nArrived: 1700000000000\nClient: 10.0.0.5\nHelo: web01\n"
       "Sender: vm@example.org\nRecipient: ops@example.org\nRecipient: b@example.net\nSize: 24\n\n"
       "Subject: x\r\n\r\nbody\r\n...")
put("spool_decode", "whole", msg)
put("spool_decode", "torn", msg[:-5])
put("spool_decode", "no-recipient", msg.replace("Recipient: ops@example.org\nRecipient: b@example.net\n", ""))
put("spool_decode", "bad-size", msg.replace("Size: 24", "Size: 99999999999999999999999"))

# --- ssh_target: 4-byte LE port, then the host string.
for n, (port, host) in enumerate([(22, "web01"), (22, "WEB01.proj.test."), (2222, "db01"), (22, "10.0.0.5"),
                                   (22, "[fd00::1]"), (22, "192.168.1.1"), (0, "web01"), (70000, "web01"),
                                   (22, "unknown.example"), (22, "")]):
    put("ssh_target", f"t{n}", struct.pack("<I", port) + host.encode())

# --- syslog: byte 0 = max_message_bytes choice (0..7: 1, 8, 64, 200, 480, 2048, 8192, 65536),
# byte 1 = TCP read size, byte 2 = mode (bit 0 agent, bit 1 UDP, bit 2 v4-mapped peer).
r5424 = "<34>1 2003-10-11T22:14:15.003Z mymachine.example.com su - ID47 - 'su root' failed for lonvick on /dev/pts/8"
r5424sd = '<165>1 2003-10-11T22:14:15.003-07:00 host.example.org evntslog 8710 ID47 [exampleSDID@32473 iut="3" eventSource="Application" eventID="1011"][x@1 a="]\\"b"] \ufeffAn application event'
r3164 = "<13>Feb  5 17:32:18 10.0.0.99 myprog[123]: hello"
put("syslog", "lf-mixed", b"\x06\x07\x00" + (r5424 + "\n" + r3164 + "\n" + r5424sd + "\n<13>no host here\n\n\r\n").encode())
def octet(m):
    b = m.encode() if isinstance(m, str) else m
    return str(len(b)).encode() + b" " + b
put("syslog", "octet", b"\x06\x03\x00" + octet(r5424) + octet(r3164) + octet("<13>multi\nline\nmessage") + octet(r5424sd))
put("syslog", "octet-huge-len", b"\x03\x10\x00" + b"99999999999 <13>x\n4294967296 <13>y\n18446744073709551616 z\n000 \n0 \n")
put("syslog", "octet-over-max", b"\x03\x05\x00" + octet("<13>" + "A" * 700) + b"\n<13>after\n")
put("syslog", "torn-octet", b"\x06\x01\x00" + b"120 <13>short")
put("syslog", "digits-no-space", b"\x06\x02\x00" + b"2024-01-01 x\n12345\n1234567890123 <13>y\n")
put("syslog", "udp-5424", b"\x06\x00\x02" + r5424sd.encode())
put("syslog", "udp-agent", b"\x05\x00\x03" + r3164.encode() + b"\r\n\x00")
put("syslog", "bad-utf8", b"\x06\x04\x00" + b"<13>Feb 29 00:00:00 h app: \xff\xfe\xc3(\x1b[31m\n")
put("syslog", "dates", b"\x06\x40\x00" + b"".join(x + b"\n" for x in [
    b"<13>Feb 29 23:59:60 h a: leap", b"<13>Dec 31 23:59:59 h a: eoy", b"<13>Jan  1 00:00:00 h a: noy",
    b"<13>1 9999-12-31T23:59:59.999999+14:00 h a - - - max", b"<13>1 0000-01-01T00:00:00Z h a - - - min",
    b"<13>1 2024-02-30T25:61:61Z h a - - - bad", b"<13>1 2024-01-01T00:00:00.123456789123456789Z h a - - - frac",
    b"<13>1 - - - - - -", b"<191>1 - - - - - - max pri", b"<192>x", b"<999999999999>x", b"<-1>x", b"<>x", b"<13", b"<13>1"]))
put("syslog", "hostile-host", b"\x06\x08\x04" + b"<13>1 2024-01-01T00:00:00Z ../../etc/passwd app - - - x\n<13>1 2024-01-01T00:00:00Z .hidden a - - - y\n<13>Jan  1 00:00:00 \xc3\xa9t\xc3\xa9 a: z\n")

# --- config_tree: NUL-separated: global, cloud, site, instance, project, groups/web, hosts/web1,
# templates a.j2 and sub/b.j2, then the agent's hostname, OS and one extra label k=v.
def tree(*parts):
    return b"\x00".join(p.encode() if isinstance(p, str) else p for p in parts)
g = """[vars]
ntp = ["0.pool.ntp.org", "1.pool.ntp.org"]
relay = "smtp"
[vars.resolver]
search = ["fuzz.test"]
ndots = 1
[files.chrony]
path = "/etc/chrony/chrony.conf"
template = "a.j2"
mode = "0640"
on_change = "chrony"
[files.hosts]
path = "/etc/hosts.d/b"
template = "sub/b.j2"
[files.inline]
path = "/etc/motd"
content = "Welcome to {{ agent.fqdn }} ({{ agent.os }})\\n"
[agent]
metrics_interval = "15s"
logs.sources = [{ path = "/var/log/*.log", multiline_start = "^\\\\S" }]
"""
a = "{% for s in ntp %}server {{ s }} iburst\n{% endfor %}# {{ agent.name }} {{ agent.labels.group }}\n"
b = "{{ bastion.address }} bastion\n{% for ip in agent.addresses %}{{ ip }} {{ agent.hostname }}\n{% endfor %}{{ resolver.search | join(' ') }}\n"
put("config_tree", "normal", tree(g, "[vars]\nrelay = \"cloud\"\n", "", "", "[vars.resolver]\nndots = 2\n",
    "[vars]\n_delete = [\"relay\"]\n", "[files.chrony]\nmode = \"0600\"\n", a, b, "web1.fuzz.test", "Debian 12", "env=prod"))
put("config_tree", "hostile-facts", tree(g, "", "", "", "", "", "", a, b, "{{ 7*7 }}{% raw %}\n\x1b[31m" * 20, "\u202e" * 100, "group=../../x"))
put("config_tree", "deletes", tree(g, "", "", "", "[vars]\n_delete = [\"ntp\", \"nope\", \"\"]\n[files]\n_delete = [\"hosts\"]\n",
    "_delete = [\"files\"]\n", "[vars.ntp]\n_delete = [\"x\"]\na = 1\n", a, b, "h", "o", ""))
put("config_tree", "bad-toml", tree("[vars\n", "bogus = 1\n", "vars = 3\n", "[vars]\n_delete = 3\n", "[[files]]\n", "", "", a, "{% if %}", "", "", ""))
put("config_tree", "loops", tree("[vars]\nn = 1000\n[files.x]\npath = \"/x/y\"\ntemplate = \"a.j2\"\n", "", "", "", "", "", "",
    "{% for i in range(n) %}{% for j in range(n) %}{{ i * j }}{% endfor %}{% endfor %}", "", "", "", ""))
put("config_tree", "big-string", tree("[files.x]\npath = \"/x/y\"\ncontent = \"{{ 'x' * 100000000 }}{{ 'y' * 100000000 }}\"\n", "", "", "", "", "", "", "", "", "", "", ""))
put("config_tree", "recursion", tree("[files.x]\npath = \"/x/y\"\ntemplate = \"a.j2\"\n", "", "", "", "", "", "",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "{% include 'sub/b.j2' %}", "", "", ""))
put("config_tree", "many-files", tree("".join(f"[files.f{i}]\npath = \"/etc/f{i}\"\ncontent = \"{{{{ 'z' * 20000 }}}}\"\n" for i in range(300)), "", "", "", "", "", "", "", "", "", "", ""))
put("config_tree", "settings", tree("[agent]\nmetrics_interval = \"0.5s\"\nbogus = 1\nlogs.sources = [{ path = \"rel\" }, 3, { path = \"/a\", x = 1 }]\n[files.a]\npath = \"/etc/../shadow\"\ncontent = \"\"\nowner = \"root;rm\"\nmode = 99999\n", "", "", "", "", "", "", "", "", "", "", ""))
put("config_tree", "reserved", tree("[vars]\nagent = 1\nbastion = \"x\"\n[files.a]\npath = \"/a/b\"\ncontent = \"{{ undefined_var }}{{ agent.nope.deeper }}\"\n", "", "", "", "", "", "", "", "", "", "", ""))
put("config_tree", "dup-path", tree("[files.a]\npath = \"/a/b\"\ncontent = \"1\"\n[files.b]\npath = \"/a/b\"\ncontent = \"2\"\n", "", "", "", "", "", "", "", "", "", "", ""))
put("config_tree", "filters", tree("[vars]\nm = { b = 2, a = [1, 2.5, true, 1979-05-27T07:32:00Z] }\n[files.a]\npath = \"/a/b\"\ntemplate = \"a.j2\"\n", "", "", "", "", "", "", "{{ m | tojson }} {{ m | dictsort }} {{ m.a | sort | reverse | list }} {{ 'x' | center(50) }} {{ m.a[3] }} {{ '%s' | format(m) }} {{ m | items | list }}", "", "", "", ""))

# --- agent_logs: byte 0 = max_event_bytes choice (64, 1024, 65536, 16 MiB), byte 1 = HTTP/2 data
# frame size / 64, byte 2 bit 0 = raw body; then records [flags][u16 len][LogBatch bytes],
# flags bit 0 = compressed flag, bits 1/2 = payload repeated 64/4096 times.
def logbatch(epoch, seq, events):
    out = varint(1 << 3) + varint(epoch) + varint(2 << 3) + varint(seq)
    for ts, src, app, sev, fac, msg in events:
        e = varint(1 << 3) + varint(ts & (2**64 - 1)) + field(2, src) + field(3, app) + varint(4 << 3) + varint(sev) + varint(5 << 3) + varint(fac) + field(6, msg)
        out += field(3, e)
    return out
def rec(data, flags=0):
    return bytes([flags]) + struct.pack(">H", len(data)) + data
ev = (1700000000000, "/var/log/syslog", "sshd", 6, 4, b"Accepted publickey for root")
put("agent_logs", "in-order", b"\x01\x01\x00" + rec(logbatch(7, 1, [ev, ev])) + rec(logbatch(7, 2, [ev])) + rec(logbatch(7, 3, [])))
put("agent_logs", "repeated-seq", b"\x01\x02\x00" + rec(logbatch(7, 1, [ev])) + rec(logbatch(7, 1, [ev])) + rec(logbatch(7, 3, [ev])) + rec(logbatch(7, 2, [ev, ev])) + rec(logbatch(8, 1, [ev])))
put("agent_logs", "seq-zero", b"\x01\x01\x00" + rec(logbatch(7, 1, [ev])) + rec(logbatch(7, 0, [ev])) + rec(logbatch(7, 2, [ev])))
put("agent_logs", "negative", b"\x01\x01\x00" + rec(logbatch(2**64 - 1, 2**64 - 1, [(-1, "", "", 2**32 - 1, 2**32 - 1, b"")])) + rec(logbatch(2**64 - 1, 2**63, [ev])))
put("agent_logs", "hostile-events", b"\x00\x03\x00" + rec(logbatch(1, 1, [
    (2**63 - 1, "/a/b/c", "", 99, 99, b"\xff\xfe non utf8 \x00 nul \r\n\x1b[2J"),
    (0, "journal", "a b\tc\n", 0, 23, b"x" * 2000 + b"\n\n\r"),
    (-5, "", "\u00e9" * 300, 7, 1, b""),
])))
put("agent_logs", "many-events", b"\x02\xff\x00" + rec(logbatch(3, 1, [])) + rec(field(3, b""), flags=4) + rec(logbatch(3, 2, [ev]), flags=2))
put("agent_logs", "too-many-events", b"\x00\x40\x00" + rec(logbatch(5, 1, [ev])) + rec(varint(2 << 3) + varint(2) + field(3, b"") * 30, flags=4) + rec(logbatch(5, 3, [ev])))
put("agent_logs", "compressed", b"\x01\x01\x00" + rec(logbatch(7, 1, [ev])) + rec(logbatch(7, 2, [ev]), flags=1))
put("agent_logs", "raw-bad-frame", b"\x01\x01\x01" + b"\x00\xff\xff\xff\xff" + logbatch(1, 1, [ev]))
put("agent_logs", "raw-torn", b"\x01\x01\x01" + b"\x00\x00\x00\x00\x40" + logbatch(1, 1, [ev])[:10])
put("agent_logs", "empty", b"\x00\x00\x00")

# --- agent_session: configuration results.
put("agent_session", "config-ack", field(3, field(1, "0123456789abcdef") + varint(2 << 3) + varint(1)))
put("agent_session", "config-nack", field(3, field(1, "rev\n\x1b[31m" * 100) + field(3, "/etc/x\r\n") + field(4, "permission denied\n" * 500)))
put("agent_session", "config-empty", field(3, b""))
print("seeds written under", root)
