"""``ivshmem bridge``: relay chosen channels between this host's region and Zenoh."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import TYPE_CHECKING

from ..errors import IvshmemError

if TYPE_CHECKING:
    from ..bridge.config import BridgeConfig

_EPILOG = """\
two hosts, end to end (host A 10.0.0.1, host B 10.0.0.2; one server on each):

  A$ ivshmem-server -F -S /tmp/ivshmem_socket -l 64M -n 4 --memfd --format &
  A$ ivshmem bridge --site a --socket /tmp/ivshmem_socket \\
         --listen tcp/10.0.0.1:7447 --out frames:3 --in b/frames:3
  B$ ivshmem-server -F -S /tmp/ivshmem_socket -l 64M -n 4 --memfd --format &
  B$ ivshmem bridge --site b --socket /tmp/ivshmem_socket \\
         --connect tcp/10.0.0.1:7447 --in a/frames:5 --out frames:5

Each bridge prints "ready: peer N". On A, peer 3 (a guest or a host process) sends with
Sender(ep, "frames", receiver=N_A) and its messages arrive at peer 5 on B, which reads them
with Receiver(ep, "frames", sender=N_B); the way back is the second pair of routes.
Keys: PREFIX/SITE/CHANNEL/data and .../ack (PREFIX defaults to "ivshmem").
Every flag can also come from a TOML file (--config); see docs/bridge.md.

When the local server restarts, the bridge reconnects (as a host peer with reconnect=True
does) and prints "ready: peer N" again with its new id (also in its log, and in --id-file);
the local programs reconnect too and open their channels to that id. What the bridges hold
is kept; what sat in the old server's rings is lost, as for any channel. With
--server-timeout S it gives up after S seconds without the server and exits with status 3,
for a supervisor.
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "bridge",
        help="relay channels to other hosts over Zenoh",
        description="A host peer of the local ivshmem server (or of a plain formatted region) "
        "that relays chosen channels to Zenoh and back, so that peers on different hosts "
        "talk through the same Sender/Receiver API. Messages arrive complete, in order and "
        "once; a slow remote receiver slows the local sender.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="TOML", help="read the configuration from a file")
    parser.add_argument("--site", help="this host's site name (first key chunk after PREFIX)")
    parser.add_argument("--prefix", help='first chunk(s) of every key (default "ivshmem")')
    local = parser.add_argument_group("local side")
    local.add_argument("--socket", metavar="PATH", help="the local ivshmem server's socket")
    local.add_argument("--region", metavar="PATH", help="a plain formatted region instead")
    local.add_argument("--id", type=int, metavar="N", help="the bridge's peer id in --region")
    local.add_argument(
        "--server-timeout", type=float, metavar="S",
        help="when the local server goes away, reconnect for at most S seconds, then stop "
        "and exit with status 3 (default: reconnect as long as it takes; 0: give up at once)",
    )  # fmt: skip
    local.add_argument(
        "--id-file", metavar="PATH",
        help="write the bridge's peer id to PATH (rewritten when it reconnects to a "
        "restarted server, removed on exit)",
    )  # fmt: skip
    routes = parser.add_argument_group("routes (repeat for several channels)")
    routes.add_argument(
        "--out", action="append", default=[], metavar="CHANNEL:PEER[:drop]",
        help="relay channel CHANNEL that local peer PEER sends to the bridge; ':drop' drops "
        "messages while the remote window is full instead of slowing the sender",
    )  # fmt: skip
    routes.add_argument(
        "--in", dest="ins", action="append", default=[], metavar="SITE/CHANNEL:PEER[:LOCAL]",
        help="deliver stream CHANNEL of site SITE to local peer PEER (as channel LOCAL)",
    )  # fmt: skip
    fail = parser.add_argument_group("flow and failures")
    fail.add_argument(
        "--on-remote-lost", choices=("wait", "error"),
        help="when the receiving bridge is silent for --remote-timeout: the local sender "
        "waits (default) or gets ChannelClosedError",
    )  # fmt: skip
    fail.add_argument("--remote-timeout", type=float, metavar="S", help="default 3.0")
    fail.add_argument("--window-messages", type=int, metavar="N", help="default 1024")
    fail.add_argument("--window-bytes", metavar="SIZE", help="default 8M")
    fail.add_argument(
        "--capacity", metavar="SIZE",
        help="ring size of the channels the bridge receives on (default 64K; the largest "
        "message is half of it)",
    )  # fmt: skip
    fail.add_argument(
        "--spin", type=float, metavar="S",
        help="seconds the bridge's channel ends spin before sleeping on a doorbell (default "
        "50e-6): longer costs CPU and shortens the round trip",
    )  # fmt: skip
    z = parser.add_argument_group("Zenoh (passed through)")
    z.add_argument("--mode", choices=("peer", "client", "router"), help="default peer")
    z.add_argument("--listen", action="append", default=[], metavar="ENDPOINT",
                   help="e.g. tcp/0.0.0.0:7447 (repeatable)")  # fmt: skip
    z.add_argument("--connect", action="append", default=[], metavar="ENDPOINT",
                   help="e.g. tcp/hostb:7447 (repeatable)")  # fmt: skip
    z.add_argument("--scouting", action=argparse.BooleanOptionalAction, default=None,
                   help="multicast and gossip scouting (default off)")  # fmt: skip
    z.add_argument("--zenoh-config", metavar="JSON5", help="a Zenoh configuration file")
    parser.add_argument("--stats", action="store_true", help="print counters as JSON on exit")
    parser.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> BridgeConfig:
    from ..bridge.config import BridgeConfig, ConfigError, load_toml, parse_in, parse_out
    from ..memory import parse_size

    cfg = load_toml(args.config) if args.config else BridgeConfig(site="")
    for name in ("site", "prefix", "socket", "region", "on_remote_lost", "remote_timeout",
                 "window_messages", "spin", "server_timeout", "id_file"):  # fmt: skip
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    if args.id is not None:
        cfg.region_id = args.id
    if cfg.server_timeout == float("inf"):
        cfg.server_timeout = None  # --server-timeout inf: the default, spelled out
    if args.window_bytes is not None:
        cfg.window_bytes = parse_size(args.window_bytes)
    if args.capacity is not None:
        cfg.capacity = parse_size(args.capacity)
    cfg.outs += [parse_out(t) for t in args.out]
    cfg.ins += [parse_in(t) for t in args.ins]
    z = cfg.zenoh
    if args.mode is not None:
        z.mode = args.mode
    z.listen += args.listen
    z.connect += args.connect
    if args.scouting is not None:
        z.scouting = args.scouting
    if args.zenoh_config is not None:
        z.config_file = args.zenoh_config
    if not cfg.site:
        raise ConfigError("give this bridge's --site NAME (or site = ... in the TOML file)")
    cfg.check()
    return cfg


def run(args: argparse.Namespace) -> int:
    from .._signals import exit_on_termination
    from ..bridge.relay import Bridge, ServerLostError, describe

    status = 0

    try:
        cfg = build_config(args)
        bridge = Bridge(cfg)

        def announce(peer: int) -> None:
            with contextlib.suppress(OSError):  # nobody reads stdout any more: the log says it
                print(f"ready: peer {peer}", flush=True)

        bridge.on_reconnect = announce
        with exit_on_termination():
            bridge.start()
            try:
                for line in describe(cfg):
                    print(f"ivshmem bridge: {line}", file=sys.stderr)
                print(f"ready: peer {bridge.peer_id}", flush=True)
                bridge.wait()
            except (KeyboardInterrupt, SystemExit):
                pass
            except ServerLostError as err:
                print(f"ivshmem bridge: error: {err}; stopped (start it again once the "
                      "server is back)", file=sys.stderr)  # fmt: skip
                status = 3
            finally:
                bridge.close()
                if args.stats:
                    print(json.dumps(bridge.stats()), flush=True)
    except IvshmemError as err:
        print(f"ivshmem bridge: error: {err}", file=sys.stderr)
        return 1
    return status
