// Approves a device authorization the way a person would in a browser, with plain HTTP
// requests on the provider's own pages: the user-code form, the code confirmation, the login
// form and the consent form. Usage: node approve.mjs VERIFICATION_URI USER_CODE LOGIN
// Prints "approved" on success; exits 1 with the last page otherwise.
const [uri, userCode, login] = process.argv.slice(2);
const jar = new Map();

// Node 18's fetch (Debian bookworm's undici) has no getSetCookie: split the joined header on
// the commas that start a new cookie (not those inside an Expires date).
function setCookies(headers) {
  if (typeof headers.getSetCookie === 'function') return headers.getSetCookie();
  const joined = headers.get('set-cookie');
  return joined ? joined.split(/,(?=\s*[A-Za-z0-9_.-]+=)/) : [];
}

function remember(res) {
  for (const c of setCookies(res.headers)) {
    const [pair] = c.trim().split(';');
    const i = pair.indexOf('=');
    jar.set(pair.slice(0, i), pair.slice(i + 1));
  }
}

async function go(url, body) {
  for (let hops = 0; hops < 20; hops++) {
    const res = await fetch(url, {
      method: body ? 'POST' : 'GET',
      redirect: 'manual',
      headers: {
        cookie: [...jar].map(([k, v]) => `${k}=${v}`).join('; '),
        ...(body ? { 'content-type': 'application/x-www-form-urlencoded' } : {}),
      },
      body: body ? new URLSearchParams(body).toString() : undefined,
    });
    remember(res);
    const loc = res.headers.get('location');
    if (res.status >= 300 && res.status < 400 && loc) {
      url = new URL(loc, url).toString();
      body = undefined;
      continue;
    }
    return { url, text: await res.text(), status: res.status };
  }
  throw new Error('too many redirects');
}

let page = await go(uri);
for (let step = 0; step < 10; step++) {
  if (/success/i.test(page.text) && !/<form/i.test(page.text)) {
    console.log('approved');
    process.exit(0);
  }
  const form = page.text.match(/<form[^>]*action="([^"]+)"[^>]*>([\s\S]*?)<\/form>/i);
  if (!form) break;
  const fields = {};
  for (const m of form[2].matchAll(/<input[^>]*>/gi)) {
    const name = m[0].match(/name="([^"]+)"/)?.[1];
    const value = m[0].match(/value="([^"]*)"/)?.[1] ?? '';
    if (name) fields[name] = value;
  }
  if ('user_code' in fields) fields.user_code = userCode;
  if ('login' in fields) fields.login = login;
  if ('password' in fields) fields.password = 'test';
  if ('confirm' in fields || /confirm/i.test(form[1])) fields.confirm = 'yes';
  page = await go(new URL(form[1], page.url).toString(), fields);
}
console.error(`approval failed at ${page.url} (HTTP ${page.status}):\n${page.text}`);
process.exit(1);
