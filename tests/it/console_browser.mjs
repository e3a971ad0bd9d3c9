// Drives the console in headless Chromium (Debian's package) through playwright-core, as an
// operator would: sign in with the token, read the routes page, open an incident, replay a
// spooled record by clicking. Prints one JSON line with what it saw; exits 1 on any failure.
// Run by tests/it/console.rs, which starts the proxy and checks the results.
import { chromium } from "playwright-core";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const base = env("CONSOLE_URL");
const token = env("CONSOLE_TOKEN");
const recordId = env("RECORD_ID");
const marker = env("PAYLOAD_MARKER");
const shots = env("SCREENSHOT_DIR");
const profile = env("USER_DATA_DIR");

const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1280, height: 560 },
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
const seen = {};
try {
  const page = context.pages()[0] ?? (await context.newPage());
  const errors = [];
  const unauthorized = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  page.on("response", (r) => { if (r.status() === 401) unauthorized.push(new URL(r.url()).pathname); });

  // Without the cookie: the sign-in form, answered with 401.
  const first = await page.goto(base + "/");
  seen.unauthenticated_status = first.status();
  // The sign-in page itself is the one answer with 401; the browser logs it as an error.
  errors.length = 0;
  seen.unauthorized = unauthorized;
  await page.getByLabel("Admin token").fill(token);
  await Promise.all([page.waitForURL(base + "/"), page.getByRole("button", { name: "Sign in" }).click()]);

  // Routes: a histogram per route, its bars and the limit lines with their labels.
  seen.routes_title = await page.title();
  seen.histograms = await page.locator("svg.histogram").count();
  seen.bars = await page.locator("svg.histogram").first().locator("rect.bar").count();
  seen.limit_lines = await page.locator("svg.histogram line.limit").count();
  seen.limit_labels = await page.locator("svg.histogram text.limit-label").allTextContents();
  seen.histogram_name = await page.locator("svg.histogram").first().getAttribute("aria-labelledby");
  seen.histogram_title = await page.locator("svg.histogram title").first().textContent();
  await page.screenshot({ path: `${shots}/routes.png`, fullPage: true });
  // Keyboard: the first Tab reaches the skip link.
  await page.keyboard.press("Tab");
  seen.first_tab = await page.evaluate(() => document.activeElement?.textContent);

  // Incidents: filter by kind, open one, read the advice.
  await page.getByRole("link", { name: "Incidents" }).click();
  await page.waitForURL(base + "/incidents");
  await Promise.all([
    page.waitForURL(/kind=upstream_413/),
    page.getByLabel("Kind").selectOption("upstream_413"),
  ]);
  seen.incident_kinds = await page.locator("details.incident .kind").allTextContents();
  await page.locator("details.incident summary").first().click();
  seen.incident_open = await page.locator("details.incident").first().evaluate((d) => d.open);
  seen.advice = await page.locator("details.incident .advice h2").first().textContent();
  seen.rejector_field = await page.locator("details.incident dl.fields").first().textContent();
  await page.screenshot({ path: `${shots}/incidents.png`, fullPage: true });

  // Spool: no payload body in the list; replay one record by clicking.
  await page.getByRole("link", { name: "Spool" }).click();
  await page.waitForURL(base + "/spool");
  const listing = await page.content();
  seen.marker_in_list = listing.includes(marker);
  seen.records_before = await page.locator("table.records tbody tr").count();
  await page.screenshot({ path: `${shots}/spool.png`, fullPage: true });
  await Promise.all([
    page.waitForURL(`${base}/spool/${recordId}/replay`),
    page.getByRole("button", { name: `Replay ${recordId} now` }).click(),
  ]);
  seen.notice = await page.locator("p.notice").textContent();
  seen.records_after = await page.locator("table.records tbody tr").count();
  await page.screenshot({ path: `${shots}/spool-replayed.png`, fullPage: true });

  // Opening a record shows its body.
  await page.locator("a.record-link").first().click();
  seen.marker_in_record = (await page.locator("pre.body").textContent()).includes(marker);
  await page.screenshot({ path: `${shots}/record.png`, fullPage: true });

  // Learned limits with their evidence.
  await page.getByRole("link", { name: "Learned limits" }).click();
  await page.waitForURL(base + "/learned");
  seen.learned_text = await page.locator("main").textContent();
  seen.reset_buttons = await page.getByRole("button", { name: /^Reset learned limit of/ }).count();
  await page.screenshot({ path: `${shots}/learned.png`, fullPage: true });

  seen.errors = errors;
  console.log(JSON.stringify(seen));
} catch (e) {
  console.log(JSON.stringify(seen));
  console.error(e?.stack ?? String(e));
  process.exitCode = 1;
} finally {
  await context.close();
}
