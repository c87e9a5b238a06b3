# Helpers for the anti-spoofing test, run inside a lab namespace with `ip netns exec`.
#   udp.py recv PORT SECONDS OUTFILE   count what arrives: one line "<tag> <source>" per packet
#   udp.py send PORT COUNT SRC,DST,TAG...  send COUNT datagrams "TAG" from SRC to DST for each
#                                          triple (any SRC: the socket is transparent, so the
#                                          kernel sends from it)
import socket
import sys
import time

IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75


def recv(port, seconds, out):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    # Ready: the test waits for this file's first line.
    with open(out, "w") as f:
        f.write("ready -\n")
    deadline = time.time() + seconds
    lines = []
    while time.time() < deadline:
        s.settimeout(max(0.05, deadline - time.time()))
        try:
            data, peer = s.recvfrom(512)
        except socket.timeout:
            break
        src = peer[0]
        if src.startswith("::ffff:"):
            src = src[len("::ffff:"):]
        lines.append("%s %s\n" % (data.decode(errors="replace").strip(), src))
    with open(out, "a") as f:
        f.writelines(lines)
        f.write("done -\n")


def send(port, count, specs):
    for spec in specs:
        src, dst, tag = spec.split(",")
        v6 = ":" in dst
        s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
        if v6:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        else:
            s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        s.bind((src, 0))
        for _ in range(count):
            s.sendto(tag.encode(), (dst, port))
            time.sleep(0.002)
        s.close()


if sys.argv[1] == "recv":
    recv(int(sys.argv[2]), float(sys.argv[3]), sys.argv[4])
else:
    send(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
