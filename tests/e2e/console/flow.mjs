// The console in a real browser: Debian's headless Chromium driven by playwright-core.
// Run by tests/tests/console.rs with the daemon already started; exits non-zero on the
// first failed check. Environment:
//   APPLIANCE_TEST_NODE_PATH  node_modules with playwright-core (scripts/setup-browser)
//   SETUP_URL                 the one-time setup link the daemon printed
//   CONSOLE_URL, API_URL      https://127.0.0.1:PORT
//   CERT                      the daemon's certificate (PEM): the only one Chromium trusts
//   SHOTS                     where to write the screenshots (docs/screenshots)
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { X509Certificate, createHash } from "node:crypto";
import { mkdirSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(process.env.APPLIANCE_TEST_NODE_PATH + "/");
const { chromium } = require("playwright-core");

const { SETUP_URL, CONSOLE_URL, API_URL, CERT, SHOTS, MODEL } = process.env;
const ADMIN = ["alice", "tulip-gravel-41-orbit"];
const AUDITOR = ["audrey", "heron-quartz-77-lantern"];

// Trust exactly the daemon's key (its SPKI hash), nothing else.
const spki = new X509Certificate(readFileSync(CERT)).publicKey.export({ type: "spki", format: "der" });
const pin = createHash("sha256").update(spki).digest("base64");

mkdirSync(SHOTS, { recursive: true });
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", `--ignore-certificate-errors-spki-list=${pin}`],
});

function api(key) {
  return execFileSync("curl", ["-sS", "--noproxy", "*", "--cacert", CERT, "-o", "/dev/null", "-w", "%{http_code}",
    "-H", `Authorization: Bearer ${key}`, `${API_URL}/v1/models`], { encoding: "utf8" });
}

async function shot(page, name) {
  await page.screenshot({ path: `${SHOTS}/${name}.png`, fullPage: false });
}

// Every visible form control has a label; Tab reaches the skip link, then the navigation.
async function checkAccessible(page, what) {
  const unlabelled = await page.evaluate(() =>
    [...document.querySelectorAll("input:not([type=hidden]), select, textarea")]
      .filter((el) => el.labels.length === 0 && !el.getAttribute("aria-label"))
      .map((el) => el.name || el.id));
  assert.deepEqual(unlabelled, [], `${what}: controls without a label`);
  const ids = await page.evaluate(() => [...document.querySelectorAll("[id]")].map((e) => e.id));
  assert.deepEqual(ids.filter((id, i) => ids.indexOf(id) !== i), [], `${what}: duplicate ids`);
}

async function login(page, [user, password]) {
  await page.goto(`${CONSOLE_URL}/login`);
  await page.getByLabel("User name").fill(user);
  await page.getByLabel("Password").fill(password);
  await page.getByRole("button", { name: "Log in" }).click();
}

const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
const page = await context.newPage();
page.on("dialog", (d) => d.accept());
const external = [];
page.on("request", (r) => { if (!r.url().startsWith(CONSOLE_URL)) external.push(r.url()); });

// First run: the setup link creates the first admin and logs in.
await page.goto(SETUP_URL);
await shot(page, "setup");
await checkAccessible(page, "setup");
await page.getByLabel("User name").fill(ADMIN[0]);
await page.getByLabel("Password", { exact: true }).fill(ADMIN[1]);
await page.getByLabel("Password again").fill(ADMIN[1]);
await page.getByRole("button", { name: "Create the admin account" }).click();
await page.waitForURL(`${CONSOLE_URL}/`);
assert.equal(await page.locator("h1").textContent(), "Dashboard");

// Keyboard: the first Tab lands on the skip link, the next on the first menu entry.
await page.keyboard.press("Tab");
assert.equal(await page.evaluate(() => document.activeElement.textContent), "Skip to content");
await page.keyboard.press("Tab");
assert.equal(await page.evaluate(() => document.activeElement.textContent), "Dashboard");

// Log out and in again.
await page.getByRole("button", { name: "Log out" }).click();
await page.waitForURL(`${CONSOLE_URL}/login`);
await shot(page, "login");
await login(page, ADMIN);
await page.waitForURL(`${CONSOLE_URL}/`);

// A tenant and a key; the secret is on the page once.
await page.getByRole("link", { name: "Tenants & keys" }).click();
await page.getByLabel("New tenant name").fill("cardiology");
await page.getByRole("button", { name: "Create tenant" }).click();
await page.getByText("Tenant cardiology created.").waitFor();
await page.getByLabel("Tenant", { exact: true }).selectOption("cardiology");
await page.getByLabel("Label (the application using it)").fill("discharge letters");
await page.getByLabel("Expires after (days; empty: never)").fill("90");
await page.getByRole("button", { name: "Create key" }).click();
const secret = await page.locator("#new-secret").inputValue();
assert.match(secret, /^sk-/);
const keyId = (await page.locator(".flash.ok").textContent()).match(/Key (\S+) created/)[1];
await checkAccessible(page, "keys");

// The key works against the API; the request shows on the audit page.
assert.equal(api(secret), "200");
await page.getByRole("link", { name: "Audit" }).click();
await page.getByLabel("Key id").fill(keyId);
await page.getByRole("button", { name: "Filter" }).click();
await page.locator("td", { hasText: "models.list" }).first().waitFor();
await checkAccessible(page, "audit");
await shot(page, "audit");

// Revoked: the API refuses it.
await page.getByRole("link", { name: "Tenants & keys" }).click();
await page.locator("tr", { hasText: keyId }).getByRole("button", { name: "Revoke" }).click();
await page.getByText(`Key ${keyId} revoked.`).waitFor();
assert.equal(api(secret), "401");
await shot(page, "keys");

// The other pages render, with labelled controls.
await page.getByRole("link", { name: "Policy" }).click();
await page.getByLabel("Tenant", { exact: true }).fill("cardiology");
await page.getByRole("button", { name: "Explain" }).click();
assert.match(await page.locator("#explain-result").textContent(), /"classes"/);
await checkAccessible(page, "policy");
await shot(page, "policy");
await page.getByRole("link", { name: "Users" }).click();
await page.getByLabel("User name").first().fill(AUDITOR[0]);
await page.getByLabel("Role", { exact: true }).selectOption("auditor");
await page.getByLabel(/Initial password/).fill(AUDITOR[1]);
await page.getByRole("button", { name: "Create user" }).click();
await page.getByText("User audrey created as auditor.").waitFor();
await checkAccessible(page, "users");
await shot(page, "users");
// A model uploaded from this computer, with progress, then imported.
await page.getByRole("link", { name: "Models" }).click();
await page.getByLabel("Model file").setInputFiles(MODEL);
await page.getByLabel(/Name of the uploaded model/).fill("smollm2-browser");
await page.getByRole("button", { name: "Upload and import" }).click();
await page.locator("#upload-status", { hasText: "Imported:" }).waitFor({ timeout: 60000 });
await page.locator("td", { hasText: "smollm2-browser" }).first().waitFor({ timeout: 10000 });
for (const [link, name] of [["Models", "models"], ["Upstreams", "upstreams"], ["System", "system"]]) {
  await page.getByRole("link", { name: link }).click();
  await checkAccessible(page, name);
  await shot(page, name);
}
await page.getByRole("link", { name: "Dashboard" }).click();
// Two polls, so the charts have lines.
await page.waitForFunction(() => document.querySelector("#c-rps polyline"), null, { timeout: 10000 });
await shot(page, "dashboard");
await page.getByRole("button", { name: "Log out" }).click();
await page.waitForURL(`${CONSOLE_URL}/login`);

// An auditor: the audit page yes, the keys page no (the server answers 403).
const auditor = await (await browser.newContext({ viewport: { width: 1280, height: 800 } })).newPage();
await login(auditor, AUDITOR);
await auditor.waitForURL(`${CONSOLE_URL}/`);
assert.equal((await auditor.goto(`${CONSOLE_URL}/audit`)).status(), 200);
assert.equal((await auditor.goto(`${CONSOLE_URL}/keys`)).status(), 403);
assert.equal(await auditor.getByRole("link", { name: "Tenants & keys" }).count(), 0);

// Lockout: ten wrong passwords, then the right one is refused too.
const guesser = await (await browser.newContext()).newPage();
for (let i = 0; i < 10; i++) await login(guesser, [AUDITOR[0], "wrong-password-" + i]);
await login(guesser, AUDITOR);
assert.match(await guesser.locator(".flash.error").textContent(), /locked/);

assert.deepEqual(external, [], "the console made requests outside the appliance");
await browser.close();
console.log("console flow: ok");
