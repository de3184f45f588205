package local.pipeline.kafka;

import java.security.cert.Certificate;
import java.security.cert.CertificateParsingException;
import java.security.cert.X509Certificate;
import java.util.ArrayList;
import java.util.Collection;
import java.util.HashSet;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Set;

import javax.net.ssl.SSLPeerUnverifiedException;

import org.apache.kafka.common.Configurable;
import org.apache.kafka.common.config.ConfigException;
import org.apache.kafka.common.errors.SerializationException;
import org.apache.kafka.common.errors.SslAuthenticationException;
import org.apache.kafka.common.security.auth.AuthenticationContext;
import org.apache.kafka.common.security.auth.KafkaPrincipal;
import org.apache.kafka.common.security.auth.KafkaPrincipalBuilder;
import org.apache.kafka.common.security.auth.KafkaPrincipalSerde;
import org.apache.kafka.common.security.auth.SslAuthenticationContext;
import org.apache.kafka.common.security.authenticator.DefaultKafkaPrincipalBuilder;
import org.apache.kafka.common.security.ssl.SslPrincipalMapper;

/**
 * Makes the Kafka principal the client's SPIFFE ID ({@code User:spiffe://td/path}), taken from
 * the single {@code spiffe://} URI SAN of the mTLS leaf certificate.
 *
 * <p>Why: authorization (OPA) is written against workload identities, and SPIFFE SVIDs carry that
 * identity in the URI SAN, not in the subject DN. A client whose certificate does not carry exactly
 * one well-formed SPIFFE ID is refused outright: falling back to the DN/CN would let any cert the
 * CA ever issued act under a name the policy was never written for.
 *
 * <p>Kafka creates it from {@code principal.builder.class} with the public no-arg constructor and,
 * because it is {@link Configurable}, calls {@link #configure(Map)} with the broker configs
 * (Kafka 3.9 {@code ChannelBuilders.createPrincipalBuilder}). Unknown keys such as
 * {@value #TRUST_DOMAIN_CONFIG} are passed through as given; a {@code listener.name.x.} prefixed
 * form is not stripped, so set the plain key.
 *
 * <p>One exception, off by default: on the listeners named in {@value #DN_PRINCIPAL_LISTENERS_CONFIG}, a
 * certificate with no {@code spiffe://} URI SAN at all gets Kafka's default principal,
 * {@code User:} and its subject DN (as {@link DefaultKafkaPrincipalBuilder} gives it, after the
 * broker's {@code ssl.principal.mapping.rules}). Why: Strimzi's own listeners (replication
 * {@code REPLICATION-9091}, KRaft {@code CONTROLPLANE-9090}) carry its brokers' and operators'
 * traffic, authenticated by certificates of its cluster CA that have no SPIFFE ID, and Strimzi
 * makes those DN principals super users ({@code User:CN=<cluster>-kafka,O=io.strimzi}, ...). Only
 * list listeners whose trust store is such a CA: the DN is then a name that CA gave. A certificate
 * that does carry a SPIFFE ID keeps the SPIFFE principal on every listener, and a malformed or
 * doubled SPIFFE ID is refused there too: only "no SPIFFE ID at all" falls back.
 *
 * <p>It is also the {@link KafkaPrincipalSerde}: in KRaft the broker forwards some requests to the
 * controller with the principal serialized in the envelope, and Kafka only does that when the
 * principal builder is a serde.
 */
public class SpiffePrincipalBuilder implements KafkaPrincipalBuilder, KafkaPrincipalSerde, Configurable {

    /** Optional: the only trust domain accepted (e.g. {@code pipeline.local}). */
    public static final String TRUST_DOMAIN_CONFIG = "spiffe.trust.domain";
    /**
     * Optional: a comma list of listener names (e.g. {@code REPLICATION-9091,CONTROLPLANE-9090}) on
     * which a certificate without a SPIFFE ID gets its subject DN as principal. Matched
     * case-insensitively: Kafka reports listener names upper-cased ({@code ListenerName.normalised}).
     */
    public static final String DN_PRINCIPAL_LISTENERS_CONFIG = "spiffe.dn.principal.listeners";
    /** Kafka's own setting, honoured for the DN principals as Kafka's default builder does. */
    private static final String SSL_PRINCIPAL_MAPPING_RULES_CONFIG = "ssl.principal.mapping.rules";

    private static final String SCHEME = "spiffe://";
    /** X.509 GeneralName tag for uniformResourceIdentifier (RFC 5280 4.2.1.6). */
    private static final int SAN_URI = 6;
    /** SPIFFE-ID spec 2.3: maximum length of a SPIFFE ID. */
    private static final int MAX_ID_LENGTH = 2048;

    // Kafka's own wire format for the forwarded principal; the mappers are only used by build(),
    // which we never call on it, so null is fine.
    private final DefaultKafkaPrincipalBuilder serde = new DefaultKafkaPrincipalBuilder(null, null);

    private volatile String trustDomain; // null: any well-formed trust domain
    private volatile Set<String> dnListeners = Set.of(); // upper-cased
    // Kafka's default builder, for the DN principals of those listeners (null when there are none).
    private volatile DefaultKafkaPrincipalBuilder dnPrincipals;

    public SpiffePrincipalBuilder() {
    }

    @Override
    public void configure(Map<String, ?> configs) {
        configureTrustDomain(configs);
        configureDnListeners(configs);
    }

    private void configureTrustDomain(Map<String, ?> configs) {
        Object value = configs.get(TRUST_DOMAIN_CONFIG);
        String td = value == null ? "" : value.toString().trim();
        if (td.isEmpty()) {
            trustDomain = null;
            return;
        }
        // Fail at startup rather than refusing every client later because of a typo.
        String problem = trustDomainProblem(td);
        if (problem != null) {
            throw new ConfigException(TRUST_DOMAIN_CONFIG, td, problem);
        }
        trustDomain = td;
    }

    private void configureDnListeners(Map<String, ?> configs) {
        Object value = configs.get(DN_PRINCIPAL_LISTENERS_CONFIG);
        String list = value == null ? "" : value.toString().trim();
        if (list.isEmpty()) {
            dnListeners = Set.of();
            dnPrincipals = null;
            return;
        }
        Set<String> names = new HashSet<>();
        // -1 keeps trailing empty entries, so "A," is refused like "A,,B".
        for (String entry : list.split(",", -1)) {
            String name = entry.trim();
            // A typo here would silently refuse Strimzi's brokers (or, worse, name the wrong
            // listener): fail at startup instead.
            if (!name.matches("[A-Za-z0-9_.-]+")) {
                throw new ConfigException(DN_PRINCIPAL_LISTENERS_CONFIG, value,
                    "expected a comma list of listener names (letters, digits, '-', '_', '.'), got the entry '" + name + "'");
            }
            names.add(name.toUpperCase(Locale.ROOT));
        }
        Object rules = configs.get(SSL_PRINCIPAL_MAPPING_RULES_CONFIG);
        SslPrincipalMapper mapper;
        try {
            mapper = SslPrincipalMapper.fromRules(rules == null ? "DEFAULT" : rules.toString());
        } catch (IllegalArgumentException e) {
            throw new ConfigException(SSL_PRINCIPAL_MAPPING_RULES_CONFIG, rules, e.getMessage());
        }
        dnPrincipals = new DefaultKafkaPrincipalBuilder(null, mapper);
        dnListeners = Set.copyOf(names);
    }

    @Override
    public KafkaPrincipal build(AuthenticationContext context) {
        // This builder exists to map mTLS identities; a PLAINTEXT/SASL listener configured with it
        // is a misconfiguration, not an anonymous user.
        if (!(context instanceof SslAuthenticationContext)) {
            throw new IllegalStateException("SpiffePrincipalBuilder only supports SSL listeners, got "
                + (context == null ? "null" : context.securityProtocol()) + " context");
        }
        SslAuthenticationContext ssl = (SslAuthenticationContext) context;
        X509Certificate leaf = leafCertificate(ssl);
        List<String> ids = spiffeIds(leaf);
        DefaultKafkaPrincipalBuilder dn = dnPrincipals;
        if (ids.isEmpty() && dn != null && isDnListener(ssl.listenerName())) {
            return dn.build(ssl);
        }
        String id = single(ids);

        String problem = spiffeIdProblem(id);
        if (problem != null) {
            throw new SslAuthenticationException("client certificate SPIFFE ID '" + id + "' is malformed: " + problem);
        }
        String td = trustDomain;
        if (td != null && !td.equals(trustDomainOf(id))) {
            throw new SslAuthenticationException("client certificate SPIFFE ID '" + id
                + "' is not in the trust domain " + td);
        }
        return new KafkaPrincipal(KafkaPrincipal.USER_TYPE, id);
    }

    @Override
    public byte[] serialize(KafkaPrincipal principal) throws SerializationException {
        return serde.serialize(principal);
    }

    @Override
    public KafkaPrincipal deserialize(byte[] bytes) throws SerializationException {
        return serde.deserialize(bytes);
    }

    private static X509Certificate leafCertificate(SslAuthenticationContext context) {
        Certificate[] chain;
        try {
            chain = context.session().getPeerCertificates();
        } catch (SSLPeerUnverifiedException e) {
            // ssl.client.auth not "required", and the client sent no certificate.
            throw new SslAuthenticationException("client presented no certificate", e);
        }
        if (chain == null || chain.length == 0 || !(chain[0] instanceof X509Certificate)) {
            throw new SslAuthenticationException("client presented no X.509 certificate");
        }
        return (X509Certificate) chain[0];
    }

    private boolean isDnListener(String listenerName) {
        return listenerName != null && dnListeners.contains(listenerName.toUpperCase(Locale.ROOT));
    }

    /** The certificate's URI SANs that claim to be SPIFFE IDs (validated later). */
    private static List<String> spiffeIds(X509Certificate leaf) {
        Collection<List<?>> sans;
        try {
            sans = leaf.getSubjectAlternativeNames();
        } catch (CertificateParsingException e) {
            throw new SslAuthenticationException("client certificate has an unparseable subjectAltName", e);
        }
        List<String> ids = new ArrayList<>();
        if (sans != null) {
            for (List<?> san : sans) {
                if (san.size() >= 2 && Integer.valueOf(SAN_URI).equals(san.get(0)) && san.get(1) instanceof String) {
                    String uri = (String) san.get(1);
                    // Case-insensitive prefix so "SPIFFE://..." is reported as malformed (the spec wants
                    // a lowercase scheme) instead of silently being "no SPIFFE ID".
                    if (uri.regionMatches(true, 0, SCHEME, 0, SCHEME.length())) {
                        ids.add(uri);
                    }
                }
            }
        }
        return ids;
    }

    private static String single(List<String> ids) {
        if (ids.isEmpty()) {
            throw new SslAuthenticationException("client certificate has no spiffe:// URI SAN");
        }
        // An SVID carries exactly one SPIFFE ID (X509-SVID spec 2); with two, which one the policy
        // should see is ambiguous.
        if (ids.size() > 1) {
            throw new SslAuthenticationException("client certificate has " + ids.size()
                + " spiffe:// URI SANs, expected exactly one: " + ids);
        }
        return ids.get(0);
    }

    /** The trust domain of an already validated SPIFFE ID. */
    private static String trustDomainOf(String id) {
        int slash = id.indexOf('/', SCHEME.length());
        return id.substring(SCHEME.length(), slash);
    }

    /**
     * Checks a SPIFFE ID against the SPIFFE-ID spec, section 2: lowercase scheme, a trust domain of
     * [a-z0-9.-_] only (so no port, userinfo or uppercase), a non-empty path of segments of
     * [a-zA-Z0-9.-_] that are neither empty, "." nor "..", and no query or fragment. Hand-parsed
     * rather than via java.net.URI, which accepts and normalises far more than the spec allows.
     *
     * @return why it is malformed, or null if it is well formed
     */
    static String spiffeIdProblem(String id) {
        if (id.length() > MAX_ID_LENGTH) {
            return "longer than " + MAX_ID_LENGTH + " characters";
        }
        if (!id.startsWith(SCHEME)) {
            return "scheme must be lowercase spiffe://";
        }
        if (id.indexOf('?') >= 0) {
            return "must not have a query";
        }
        if (id.indexOf('#') >= 0) {
            return "must not have a fragment";
        }
        int slash = id.indexOf('/', SCHEME.length());
        String td = slash < 0 ? id.substring(SCHEME.length()) : id.substring(SCHEME.length(), slash);
        if (td.indexOf('@') >= 0) {
            return "must not have userinfo";
        }
        if (td.indexOf(':') >= 0) {
            return "must not have a port";
        }
        String tdProblem = trustDomainProblem(td);
        if (tdProblem != null) {
            return tdProblem;
        }
        // A bare trust domain identifies the trust domain itself, not a workload.
        if (slash < 0) {
            return "path must not be empty";
        }
        String path = id.substring(slash + 1);
        // split with -1 keeps trailing empty strings, so "a/" and "a//b" show up as empty segments.
        for (String segment : path.split("/", -1)) {
            if (segment.isEmpty()) {
                return "path must not contain empty segments";
            }
            if (segment.equals(".") || segment.equals("..")) {
                return "path must not contain '.' or '..' segments";
            }
            for (int i = 0; i < segment.length(); i++) {
                char c = segment.charAt(i);
                if (!(isLowerAlnum(c) || c >= 'A' && c <= 'Z' || c == '.' || c == '-' || c == '_')) {
                    return "path contains the character '" + c + "' (allowed: letters, digits, '.', '-', '_')";
                }
            }
        }
        return null;
    }

    /** @return why a trust domain name is malformed, or null if it is well formed */
    static String trustDomainProblem(String td) {
        if (td.isEmpty()) {
            return "trust domain must not be empty";
        }
        for (int i = 0; i < td.length(); i++) {
            char c = td.charAt(i);
            if (!(isLowerAlnum(c) || c == '.' || c == '-' || c == '_')) {
                return "trust domain contains the character '" + c
                    + "' (allowed: lowercase letters, digits, '.', '-', '_')";
            }
        }
        return null;
    }

    private static boolean isLowerAlnum(char c) {
        return c >= 'a' && c <= 'z' || c >= '0' && c <= '9';
    }
}
