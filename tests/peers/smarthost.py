#!/usr/bin/python3
"""A smarthost for the SMTP relay tests, built on aiosmtpd (Debian python3-aiosmtpd): a real,
maintained SMTP server implementation that, unlike Postfix's smtp-sink, speaks STARTTLS,
implicit TLS and AUTH without a SASL daemon.

It records, under --dir:
  events.jsonl   one JSON line per event, in order: connect and disconnect (with a
                 connection number), auth (mechanism, user, tls, ok), mail (sender, tls,
                 authenticated user, connection), rcpt (address, accepted)
  msg-N.json     each accepted message: {"mail_from", "rcpt_tos", "tls", "auth"}
  msg-N.eml      its content, byte for byte as received (after dot-unstuffing)
Files are written under a temporary name and renamed, so a reader never sees half a file.

Usage: smarthost.py --port P --dir D [--tls none|starttls|implicit --cert C --key K]
                    [--auth USER:PASSWORD] [--reject-rcpt ADDR]... [--tempfail-rcpt ADDR]...
                    [--pipelining]
--pipelining advertises PIPELINING (RFC 2920): aiosmtpd reads commands one after the other
from its stream, so pipelined commands are served in order, each with its own reply.
"""
import argparse
import asyncio
import itertools
import json
import os
import ssl

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

args = None
counter = itertools.count()
connections = itertools.count()


def record(event):
    with open(os.path.join(args.dir, "events.jsonl"), "a") as f:
        f.write(json.dumps(event) + "\n")


def write_atomic(name, data):
    tmp = os.path.join(args.dir, "." + name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, os.path.join(args.dir, name))


class Server(SMTP):
    def tls_active(self):
        return self._tls_protocol is not None or (
            self.transport is not None
            and self.transport.get_extra_info("ssl_object") is not None
        )

    def connection_made(self, transport):
        first = self._original_transport is None and self.transport is None
        super().connection_made(transport)
        if first:
            self.conn_id = next(connections)
            record({"event": "connect", "conn": self.conn_id})

    def connection_lost(self, exc):
        if getattr(self, "conn_id", None) is not None and not getattr(self, "lost", False):
            self.lost = True
            record({"event": "disconnect", "conn": self.conn_id})
        super().connection_lost(exc)

    async def smtp_AUTH(self, arg):
        # Logged before aiosmtpd looks at it: AUTH sent in plaintext must show up here.
        record({"event": "auth-command", "tls": self.tls_active(),
                "mechanism": (arg or "").split(" ")[0]})
        return await super().smtp_AUTH(arg)


class Handler:
    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if args.pipelining:
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        record({"event": "mail", "sender": address, "tls": server.tls_active(),
                "conn": getattr(server, "conn_id", None),
                "auth": session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else None})
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        ok = address not in (args.reject_rcpt or []) + (args.tempfail_rcpt or [])
        record({"event": "rcpt", "address": address, "accepted": ok})
        if address in (args.tempfail_rcpt or []):
            return "450 4.2.1 <%s>: Recipient address rejected: try again later" % address
        if not ok:
            return "550 5.1.1 <%s>: Recipient address rejected: no such user" % address
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        n = next(counter)
        auth = session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else None
        write_atomic("msg-%d.eml" % n, envelope.original_content)
        write_atomic("msg-%d.json" % n, json.dumps({
            "mail_from": envelope.mail_from, "rcpt_tos": envelope.rcpt_tos,
            "mail_options": envelope.mail_options, "conn": getattr(server, "conn_id", None),
            "tls": server.tls_active(), "auth": auth}).encode())
        return "250 2.0.0 OK: queued as %d" % n


def authenticator(server, session, envelope, mechanism, auth_data):
    ok = isinstance(auth_data, LoginPassword) and args.auth is not None and \
        "%s:%s" % (auth_data.login.decode(), auth_data.password.decode()) == args.auth
    record({"event": "auth", "mechanism": mechanism, "tls": server.tls_active(), "ok": ok,
            "user": auth_data.login.decode() if isinstance(auth_data, LoginPassword) else None})
    return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


def main():
    global args
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--tls", choices=["none", "starttls", "implicit"], default="none")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--auth")
    p.add_argument("--reject-rcpt", action="append")
    p.add_argument("--tempfail-rcpt", action="append")
    p.add_argument("--pipelining", action="store_true")
    args = p.parse_args()
    ctx = None
    if args.tls != "none":
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.cert, args.key)
    kw = dict(hostname="smarthost.test", decode_data=False, ident="smarthost",
              # Advertise AUTH even without TLS, so a client that would send it in
              # plaintext is caught (the test checks that bastide never does).
              auth_require_tls=False, authenticator=authenticator,
              auth_exclude_mechanism=["CRAM-MD5"])
    if args.tls == "starttls":
        kw["tls_context"] = ctx
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(
        lambda: Server(Handler(), loop=loop, **kw), "127.0.0.1", args.port,
        ssl=ctx if args.tls == "implicit" else None))
    record({"event": "listening"})
    try:
        loop.run_forever()
    finally:
        server.close()


if __name__ == "__main__":
    main()
