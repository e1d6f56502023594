// @ts-check
/**
 * The dashboard's HTTP API calls: plain fetch against the API on this origin,
 * with the credential the user entered (sessionStorage, so it ends with the
 * tab). Errors are the API's typed errors: `{ error: { code, message } }`.
 */

const CREDENTIAL = "agentvm-credential";

export class ApiError extends Error {
  /** @param {string} code @param {string} message @param {number} status */
  constructor(code, message, status) {
    super(message);
    this.code = code;
    this.status = status;
  }
}

export function credential() {
  return sessionStorage.getItem(CREDENTIAL) ?? "";
}

/** @param {string} value */
export function setCredential(value) {
  if (value) sessionStorage.setItem(CREDENTIAL, value);
  else sessionStorage.removeItem(CREDENTIAL);
}

/** @param {string} path @param {RequestInit} [init] */
async function request(path, init = {}) {
  const headers = new Headers(init.headers);
  const token = credential();
  if (token) headers.set("authorization", `Bearer ${token}`);
  const response = await fetch(path, { ...init, headers });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const error = body?.error;
    throw new ApiError(error?.code ?? "HTTP_ERROR", error?.message ?? `${path}: HTTP ${response.status}`, response.status);
  }
  return body;
}

/** @param {string} part */
const segment = (part) => encodeURIComponent(part);

/** Bytes in a JSON reply arrive as `{ $base64 }`. @param {unknown} value */
export function bytesToText(value) {
  if (value && typeof value === "object" && "$base64" in value && typeof value.$base64 === "string") {
    const binary = atob(value.$base64);
    return new TextDecoder().decode(Uint8Array.from(binary, (char) => char.charCodeAt(0)));
  }
  return typeof value === "string" ? value : "";
}

export const api = {
  /** @returns {Promise<string[]>} */
  definitions: async () => (await request("/api/definitions")).value,
  /** @param {string} definition */
  listVms: async (definition) => (await request(`/api/${segment(definition)}/vms`)).value,
  /** @param {string} definition @param {string} key */
  status: async (definition, key) => (await request(`/api/${segment(definition)}/${segment(key)}/status`)).value,
  /** @param {string} definition @param {string} key @param {string} action @param {unknown[]} args */
  action: async (definition, key, action, args = []) =>
    (
      await request(`/api/${segment(definition)}/${segment(key)}/actions/${segment(action)}`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(args),
      })
    ).value,
};
