// A real OpenID provider for the client-authentication tests: panva/oidc-provider with the
// client-credentials grant, every client authentication method of OIDC Core §9 and RFC 8705
// tls_client_auth. Started by tests/oidc_provider.py on a free 127.0.0.1 port with a JSON
// config file; prints one JSON line per event on stdout ("listening", then each grant).
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import { X509Certificate } from 'node:crypto';
import Provider from 'oidc-provider';

const conf = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const say = (fields) => process.stdout.write(`${JSON.stringify(fields)}\n`);
const scheme = conf.tls ? 'https' : 'http';
const issuer = `${scheme}://127.0.0.1:${conf.port}`;

function peerCertificate(ctx) {
  const socket = ctx.req.socket;
  const raw = typeof socket.getPeerCertificate === 'function' ? socket.getPeerCertificate(false) : null;
  if (!raw || !raw.raw) return undefined;
  return new X509Certificate(raw.raw);
}

const provider = new Provider(issuer, {
  clients: conf.clients,
  clientAuthMethods: [
    'client_secret_basic', 'client_secret_post', 'client_secret_jwt', 'private_key_jwt',
    ...(conf.tls ? ['tls_client_auth'] : []),
  ],
  enabledJWA: {
    clientAuthSigningAlgValues: ['HS256', 'RS256', 'PS256', 'ES256', 'ES384'],
  },
  features: {
    clientCredentials: { enabled: true },
    devInteractions: { enabled: false },
    mTLS: conf.tls ? {
      enabled: true,
      tlsClientAuth: true,
      getCertificate(ctx) { return peerCertificate(ctx)?.toString(); },
      certificateAuthorized(ctx) { return ctx.req.socket.authorized === true; },
      certificateSubjectMatches(ctx, property, expected) {
        const cert = peerCertificate(ctx);
        if (!cert) return false;
        if (property === 'tls_client_auth_subject_dn') return cert.subject.split('\n').reverse().join(',') === expected || cert.subject === expected;
        if (property === 'tls_client_auth_san_dns') return (cert.subjectAltName || '').split(', ').includes(`DNS:${expected}`);
        return false;
      },
    } : { enabled: false },
  },
  ttl: { ClientCredentials: conf.ttl || 600 },
});
provider.proxy = false;
provider.on('grant.success', (ctx) => say({ event: 'grant.success', client_id: ctx.oidc.client?.clientId, method: ctx.oidc.client?.clientAuthMethod ?? ctx.oidc.client?.tokenEndpointAuthMethod }));
provider.on('grant.error', (ctx, err) => say({ event: 'grant.error', client_id: ctx.oidc.client?.clientId, error: err.error, description: err.error_description }));

const server = conf.tls
  ? https.createServer({
      key: fs.readFileSync(conf.tls.key), cert: fs.readFileSync(conf.tls.cert),
      ca: fs.readFileSync(conf.tls.ca), requestCert: true, rejectUnauthorized: false,
    }, provider.callback())
  : http.createServer(provider.callback());
server.listen(conf.port, '127.0.0.1', () => say({ event: 'listening', issuer, port: server.address().port }));
process.on('SIGTERM', () => server.close(() => process.exit(0)));
