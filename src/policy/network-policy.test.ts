// Unit tests of the network policy (DESIGN §3 "Network policy") and of the
// egress floor's address test: pure functions, no sockets.
import assert from "node:assert/strict";
import { networkInterfaces } from "node:os";
import { describe, test } from "node:test";
import { isFloorAddress } from "../net/egress.ts";
import { decide, mayAllowByAddress, namesAddressExplicitly, namesHostAndPort, parseNetworkPolicy, parsePattern, type NetworkPermission } from "./network-policy.ts";

const connect = (host: string, port?: number, address?: string) => ({ operation: "connect" as const, host, ...(port === undefined ? {} : { port }), ...(address === undefined ? {} : { address }) });

function invalid(value: unknown, pattern: RegExp): void {
  assert.throws(
    () => parseNetworkPolicy(value),
    (error: Error & { code?: string }) => {
      assert.equal(error.code, "INVALID_ARGUMENT");
      assert.match(error.message, pattern);
      return true;
    },
  );
}

describe("parseNetworkPolicy", () => {
  test("shorthands and the default", () => {
    assert.equal(parseNetworkPolicy(undefined).default, "deny");
    assert.equal(parseNetworkPolicy("deny").default, "deny");
    assert.equal(parseNetworkPolicy("allow").default, "allow");
    assert.equal(parseNetworkPolicy({ rules: [] }).default, "deny");
    assert.equal(parseNetworkPolicy({ default: "allow", rules: [] }).default, "allow");
  });

  test("invalid policies are rejected, naming the field and the rule", () => {
    invalid("open", /permissions\.network/);
    invalid({ default: "maybe", rules: [] }, /permissions\.network\.default/);
    invalid({ rules: "x" }, /permissions\.network\.rules must be an array/);
    invalid({ rules: [], extra: 1 }, /extra/);
    invalid({ rules: [{ mode: "permit", patterns: ["*"] }] }, /permissions\.network\.rules\[0\]\.mode/);
    invalid({ rules: [{ mode: "allow", patterns: ["a.com"] }, { mode: "allow", operations: ["bind"], patterns: ["*"] }] }, /permissions\.network\.rules\[1\]\.operations\[0\] "bind" is not an operation/);
    invalid({ rules: [{ mode: "allow", patterns: [] }] }, /permissions\.network\.rules\[0\]\.patterns must be a non-empty array/);
    invalid({ rules: [{ mode: "allow", operations: [] }] }, /permissions\.network\.rules\[0\]\.operations must be a non-empty array/);
    invalid({ rules: [{ mode: "allow", patterns: [""] }] }, /permissions\.network\.rules\[0\]\.patterns\[0\] must be a non-empty string/);
    invalid({ rules: [{ mode: "allow", patterns: ["ok.com", "10.0.0.0/33"] }] }, /permissions\.network\.rules\[0\]\.patterns\[1\] "10\.0\.0\.0\/33" is not a valid CIDR/);
    invalid({ rules: [{ mode: "allow", patterns: ["fd00::/129"] }] }, /is not a valid CIDR/);
    invalid({ rules: [{ mode: "allow", patterns: ["nothost/8"] }] }, /is not a valid CIDR/);
    invalid({ rules: [{ mode: "allow", patterns: ["host:9000-8000"] }] }, /permissions\.network\.rules\[0\]\.patterns\[0\] "host:9000-8000": the port must be/);
    invalid({ rules: [{ mode: "allow", patterns: ["host:0"] }] }, /"host:0": the port/);
    invalid({ rules: [{ mode: "allow", patterns: ["host:65536"] }] }, /"host:65536": the port/);
    invalid({ rules: [{ mode: "allow", patterns: ["host:http"] }] }, /"host:http": the port/);
    invalid({ rules: [{ mode: "allow", patterns: ["*.-bad-.com"] }] }, /not a valid wildcard host/);
    invalid({ rules: [{ mode: "allow", patterns: ["bad host"] }] }, /"bad host" is not a host name/);
    invalid({ rules: [{ mode: "allow", unknown: true }] }, /unknown/);
  });

  test("operation aliases: fetch and http mean connect", () => {
    const policy = parseNetworkPolicy({ rules: [{ mode: "allow", operations: ["FETCH"], patterns: ["a.example"] }, { mode: "allow", operations: ["http"], patterns: ["b.example"] }] });
    assert.equal(decide(policy, connect("a.example", 443)).allow, true);
    assert.equal(decide(policy, connect("b.example", 80)).allow, true);
    assert.equal(decide(policy, { operation: "dns", host: "a.example" }).allow, false);
  });

  test("patterns parse host and ports", () => {
    assert.deepEqual(parsePattern("API.Example.com:443").ports, [443, 443]);
    assert.deepEqual(parsePattern("host:8000-9000").ports, [8000, 9000]);
    assert.equal(parsePattern("host:*").ports, undefined);
    assert.deepEqual(parsePattern("[2001:db8::1]:443").ports, [443, 443]);
    assert.equal(parsePattern("2001:db8::1").ports, undefined, "a bare IPv6 address is not host:port");
    assert.equal(parsePattern("fd00::/8").host.kind, "address");
  });
});

describe("decide", () => {
  test("default deny; rules name the destination", () => {
    const policy = parseNetworkPolicy(undefined);
    const decision = decide(policy, connect("example.com", 443));
    assert.deepEqual(decision, { allow: false, rule: "default (deny)" });
  });

  test("exact host matches any port but not subdomains", () => {
    const policy = parseNetworkPolicy({ rules: [{ mode: "allow", patterns: ["api.example.com"] }] });
    assert.equal(decide(policy, connect("api.example.com", 1)).allow, true);
    assert.equal(decide(policy, connect("api.example.com", 65535)).allow, true);
    assert.equal(decide(policy, connect("x.api.example.com", 443)).allow, false);
    assert.equal(decide(policy, connect("example.com", 443)).allow, false);
  });

  test("*.suffix matches subdomains only, at a label boundary", () => {
    const policy = parseNetworkPolicy({ rules: [{ mode: "allow", patterns: ["*.svc.test"] }] });
    assert.equal(decide(policy, connect("a.svc.test", 1)).allow, true);
    assert.equal(decide(policy, connect("a.b.svc.test", 1)).allow, true);
    assert.equal(decide(policy, connect("svc.test", 1)).allow, false);
    assert.equal(decide(policy, connect("evilsvc.test", 1)).allow, false);
  });

  test("port ranges are inclusive", () => {
    const policy = parseNetworkPolicy({ rules: [{ mode: "allow", operations: ["connect"], patterns: ["*.svc.test:8000-9000"] }] });
    assert.equal(decide(policy, connect("a.svc.test", 7999)).allow, false);
    assert.equal(decide(policy, connect("a.svc.test", 8000)).allow, true);
    assert.equal(decide(policy, connect("a.svc.test", 9000)).allow, true);
    assert.equal(decide(policy, connect("a.svc.test", 9001)).allow, false);
    assert.equal(decide(policy, { operation: "dns", host: "a.svc.test" }).allow, false, "a port pattern never matches a lookup");
  });

  test("a matching deny rule beats an allow rule, in any order", () => {
    for (const rules of [
      [{ mode: "allow", patterns: ["*"] }, { mode: "deny", patterns: ["bad.example.com"] }],
      [{ mode: "deny", patterns: ["bad.example.com"] }, { mode: "allow", patterns: ["*"] }],
    ] as const) {
      const policy = parseNetworkPolicy({ default: "allow", rules: rules as unknown as Extract<NetworkPermission, { rules: unknown }>["rules"] });
      const denied = decide(policy, connect("bad.example.com", 443));
      assert.equal(denied.allow, false);
      assert.match(denied.rule, /^rules\[\d\] \(deny \* bad\.example\.com\)$/);
      assert.equal(decide(policy, connect("good.example.com", 443)).allow, true);
    }
  });

  test("IP and CIDR patterns match the resolved address and IPv4-mapped forms", () => {
    const policy = parseNetworkPolicy({ rules: [{ mode: "deny", patterns: ["203.0.113.0/24"] }, { mode: "allow", patterns: ["*"] }] });
    assert.equal(decide(policy, connect("203.0.113.9", 443)).allow, false);
    assert.equal(decide(policy, connect("::ffff:203.0.113.9", 443)).allow, false);
    assert.equal(decide(policy, connect("name.example", 443, "203.0.113.9")).allow, false, "the resolved address is checked too");
    assert.equal(decide(policy, connect("198.51.100.1", 443)).allow, true);
  });

  test("operations are kept apart", () => {
    const policy = parseNetworkPolicy({ rules: [{ mode: "allow", operations: ["dns"], patterns: ["*"] }] });
    assert.equal(decide(policy, { operation: "dns", host: "example.com" }).allow, true);
    assert.equal(decide(policy, connect("example.com", 443)).allow, false);
  });
});

describe("namesAddressExplicitly / namesHostAndPort", () => {
  test("only an allow rule naming the IP or a real CIDR lifts the floor", () => {
    const named = parseNetworkPolicy({ rules: [{ mode: "allow", patterns: ["10.0.0.5", "192.168.0.0/16"] }] });
    assert.equal(namesAddressExplicitly(named, connect("10.0.0.5", 80)), true);
    assert.equal(namesAddressExplicitly(named, connect("db.local", 80, "10.0.0.5")), true);
    assert.equal(namesAddressExplicitly(named, connect("192.168.4.4", 80)), true);
    assert.equal(namesAddressExplicitly(named, connect("10.0.0.6", 80)), false);
    for (const broad of [["*"], ["0.0.0.0/0"], ["::/0"], ["*.example.com"], ["db.local"]]) {
      const policy = parseNetworkPolicy({ default: "allow", rules: [{ mode: "allow", patterns: broad }] });
      assert.equal(namesAddressExplicitly(policy, connect("db.local", 80, "10.0.0.5")), false, `${broad[0]} must not lift the floor`);
    }
    const denyOnly = parseNetworkPolicy({ default: "allow", rules: [{ mode: "deny", patterns: ["10.0.0.5"] }] });
    assert.equal(namesAddressExplicitly(denyOnly, connect("10.0.0.5", 80)), false);
  });

  test("an address pattern lifts the floor even when a name pattern of the same rule matches first", () => {
    const policy = parseNetworkPolicy({ rules: [{ mode: "allow", operations: ["connect"], patterns: ["*.svc.test", "127.0.0.1"] }] });
    assert.equal(namesAddressExplicitly(policy, connect("a.svc.test", 8080, "127.0.0.1")), true);
    assert.equal(namesAddressExplicitly(policy, connect("a.svc.test", 8080, "127.0.0.2")), false);
    const ported = parseNetworkPolicy({ rules: [{ mode: "allow", patterns: ["*.svc.test", "127.0.0.1:8000-9000"] }] });
    assert.equal(namesAddressExplicitly(ported, connect("a.svc.test", 8080, "127.0.0.1")), true);
    assert.equal(namesAddressExplicitly(ported, connect("a.svc.test", 9001, "127.0.0.1")), false);
  });

  test("mayAllowByAddress: whether a name the rules refuse could still be allowed once resolved", () => {
    assert.equal(mayAllowByAddress(parseNetworkPolicy("deny"), "connect", 443), false);
    assert.equal(mayAllowByAddress(parseNetworkPolicy({ rules: [{ mode: "allow", patterns: ["api.example.com", "*.svc.test"] }] }), "connect", 443), false);
    assert.equal(mayAllowByAddress(parseNetworkPolicy({ rules: [{ mode: "allow", patterns: ["203.0.113.0/24"] }] }), "connect", 443), true);
    assert.equal(mayAllowByAddress(parseNetworkPolicy({ rules: [{ mode: "allow", patterns: ["203.0.113.7:80"] }] }), "connect", 443), false);
    assert.equal(mayAllowByAddress(parseNetworkPolicy({ rules: [{ mode: "allow", operations: ["dns"], patterns: ["203.0.113.7"] }] }), "connect", 443), false);
    assert.equal(mayAllowByAddress(parseNetworkPolicy({ rules: [{ mode: "deny", patterns: ["203.0.113.7"] }] }), "connect", 443), false);
  });

  test("host.agentvm.internal needs an exact name with ports", () => {
    const policy = parseNetworkPolicy({ rules: [{ mode: "allow", operations: ["connect"], patterns: ["host.agentvm.internal:5432"] }] });
    assert.equal(namesHostAndPort(policy, "host.agentvm.internal", 5432), true);
    assert.equal(namesHostAndPort(policy, "host.agentvm.internal", 5433), false);
    assert.equal(namesHostAndPort(parseNetworkPolicy("allow"), "host.agentvm.internal", 5432), false);
    assert.equal(namesHostAndPort(parseNetworkPolicy({ rules: [{ mode: "allow", patterns: ["host.agentvm.internal"] }] }), "host.agentvm.internal", 5432), false, "no port, no host loopback");
    assert.equal(namesHostAndPort(parseNetworkPolicy({ rules: [{ mode: "allow", operations: ["dns"], patterns: ["host.agentvm.internal:5432"] }] }), "host.agentvm.internal", 5432), false);
  });
});

describe("isFloorAddress (the egress floor)", () => {
  test("private, shared, link-local, loopback, unspecified and multicast addresses", () => {
    for (const address of [
      "10.0.0.1", "172.16.0.1", "172.31.255.255", "192.168.1.1", "100.64.0.1", "169.254.169.254", "127.0.0.1", "127.0.0.2", "0.0.0.0",
      "224.0.0.1", "255.255.255.255", "198.18.0.254",
      "::", "::1", "fd00::1", "fc00::1", "fe80::1", "ff02::1", "[::1]", "[fd00::1]",
      "::ffff:10.0.0.1", "::ffff:127.0.0.1", "::ffff:a00:1", "::ffff:7f00:1", "0:0:0:0:0:ffff:7f00:1", "::ffff:169.254.169.254",
      "::127.0.0.1", "::7f00:1", "64:ff9b::a00:1",
      "2130706433", "0x7f.1", "not an address",
    ]) {
      assert.equal(isFloorAddress(address), true, `${address} must be below the floor`);
    }
  });

  test("public addresses pass", () => {
    for (const address of ["1.1.1.1", "8.8.8.8", "172.32.0.1", "2606:4700::1111", "::ffff:1.1.1.1"]) {
      assert.equal(isFloorAddress(address), false, `${address} is public`);
    }
  });

  test("every address of the host's own interfaces is below the floor, whatever its range", () => {
    const own = Object.values(networkInterfaces()).flatMap((infos) => (infos ?? []).map((info) => info.address));
    assert.ok(own.length > 0);
    for (const address of own) assert.equal(isFloorAddress(address), true, `host address ${address}`);
  });
});
