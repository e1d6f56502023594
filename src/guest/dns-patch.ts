/**
 * Routes name resolution to the VM kernel. `dns.lookup` (what net, http and fetch
 * use) and the Resolver's A/AAAA queries ask the kernel, which answers for the
 * VM's loopback names and applies the network policy to everything else. Other
 * record types stay on c-ares, which the permission model already refuses.
 */
import dns from "node:dns";
import { isIP } from "node:net";
import { systemError, type KernelCallError, type KernelClient } from "./kernel-client.ts";

interface LookupAddress {
  address: string;
  family: 4 | 6;
}

type LookupOptions = { family?: number | string; all?: boolean; order?: string; verbatim?: boolean };

export function installDnsPatch(kernel: KernelClient): void {
  async function resolve(hostname: string, options: LookupOptions): Promise<LookupAddress[]> {
    const family = options.family === "IPv6" ? 6 : options.family === "IPv4" ? 4 : Number(options.family ?? 0);
    const literal = isIP(hostname);
    if (literal) return [{ address: hostname, family: literal as 4 | 6 }];
    try {
      const { addresses } = await kernel.call<{ addresses: LookupAddress[] }>("lookup", { hostname });
      const wanted = family === 4 || family === 6 ? addresses.filter((a) => a.family === family) : addresses;
      if (wanted.length === 0) throw systemError({ code: "ENOTFOUND", message: `no ${family ? `IPv${family} ` : ""}address for ${hostname}` }, "getaddrinfo", { hostname });
      return wanted;
    } catch (error) {
      if ((error as NodeJS.ErrnoException).syscall) throw error;
      throw systemError(error as KernelCallError, "getaddrinfo", { hostname });
    }
  }

  function lookup(hostname: string, optionsOrCallback: unknown, maybeCallback?: unknown): void {
    const callback = (typeof optionsOrCallback === "function" ? optionsOrCallback : maybeCallback) as (...args: unknown[]) => void;
    const raw = typeof optionsOrCallback === "function" ? {} : optionsOrCallback;
    const options: LookupOptions = typeof raw === "number" ? { family: raw } : ((raw ?? {}) as LookupOptions);
    if (typeof callback !== "function") throw new TypeError('The "callback" argument must be of type function');
    resolve(String(hostname || "localhost"), options).then(
      (addresses) => {
        if (options.all) callback(null, addresses);
        else callback(null, addresses[0]!.address, addresses[0]!.family);
      },
      (error) => callback(error),
    );
  }

  async function lookupPromise(hostname: string, options: LookupOptions | number = {}): Promise<LookupAddress | LookupAddress[]> {
    const normalized = typeof options === "number" ? { family: options } : options;
    const addresses = await resolve(String(hostname || "localhost"), normalized);
    return normalized.all ? addresses : addresses[0]!;
  }

  function resolver(family: 4 | 6) {
    return (hostname: string, optionsOrCallback: unknown, maybeCallback?: unknown) => {
      const callback = (typeof optionsOrCallback === "function" ? optionsOrCallback : maybeCallback) as (...args: unknown[]) => void;
      resolve(hostname, { family }).then(
        (list) => callback(null, list.map((a) => a.address)),
        (error) => callback(error),
      );
    };
  }

  const mutableDns = dns as unknown as Record<string, unknown>;
  mutableDns.lookup = lookup;
  (dns.promises as unknown as Record<string, unknown>).lookup = lookupPromise;
  const resolverProto = dns.Resolver.prototype as unknown as Record<string, unknown>;
  resolverProto.resolve4 = resolver(4);
  resolverProto.resolve6 = resolver(6);
  mutableDns.resolve4 = resolver(4);
  mutableDns.resolve6 = resolver(6);
  const promiseResolver = dns.promises.Resolver.prototype as unknown as Record<string, unknown>;
  promiseResolver.resolve4 = async (hostname: string) => (await resolve(hostname, { family: 4 })).map((a) => a.address);
  promiseResolver.resolve6 = async (hostname: string) => (await resolve(hostname, { family: 6 })).map((a) => a.address);
  (dns.promises as unknown as Record<string, unknown>).resolve4 = promiseResolver.resolve4;
  (dns.promises as unknown as Record<string, unknown>).resolve6 = promiseResolver.resolve6;
}
