// A real OpenID Connect provider for bastide's single sign-on tests: oidc-provider (OpenID
// Certified) on loopback with the Device Authorization Grant, one public client and static
// test users. Usage: node provider.mjs PORT. Prints "listening ISSUER" when ready.
//
// oidc-provider 8.x: the last major that runs on Debian bookworm's Node.js 18 (9.x needs
// Node 20.18+), and on Node 20 and 22.
//
// Users (any password): alice (groups ops, email alice@example.org verified), mallory
// (group nobody), "bad name" (a name bastide refuses).
import Provider from 'oidc-provider';

const port = Number(process.argv[2] || 0);
const users = {
  alice: { email: 'alice@example.org', email_verified: true, groups: ['ops', 'staff'] },
  mallory: { email: 'mallory@example.org', email_verified: true, groups: ['nobody'] },
  'bad name': { email: 'bad@example.org', email_verified: true, groups: ['ops'] },
};

function start(issuer, server) {
  const provider = new Provider(issuer, {
    clients: [
      {
        client_id: 'bastide',
        token_endpoint_auth_method: 'none',
        grant_types: ['urn:ietf:params:oauth:grant-type:device_code'],
        response_types: [],
        redirect_uris: [],
      },
    ],
    features: {
      deviceFlow: { enabled: true },
      devInteractions: { enabled: true },
    },
    scopes: ['openid', 'email', 'profile', 'groups'],
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      profile: ['preferred_username'],
      groups: ['groups'],
    },
    conformIdTokenClaims: false,
    cookies: { keys: ['bastide-test-only'] },
    findAccount: async (ctx, id) => {
      const u = users[id];
      if (!u) return undefined;
      return {
        accountId: id,
        claims: async () => ({ sub: id, preferred_username: id, ...u }),
      };
    },
    ttl: { DeviceCode: 600, IdToken: 3600 },
  });
  provider.on('server_error', (ctx, err) => console.error('server_error', err));
  server.on('request', provider.callback());
}

import http from 'node:http';
const server = http.createServer();
server.listen(port, '127.0.0.1', () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  start(issuer, server);
  console.log(`listening ${issuer}`);
});
