package io.keybinder.esignet;

import java.util.Map;

/** The wallet key types KeyBinder accepts, named as its {@code allowed_key_types} setting names them. */
public enum WalletKeyType {
    EC_P256("EC-P256"),
    EC_P384("EC-P384"),
    RSA("RSA"),
    ED25519("Ed25519");

    public final String label;

    WalletKeyType(String label) {
        this.label = label;
    }

    static WalletKeyType byLabel(String label) {
        for (WalletKeyType type : values()) {
            if (type.label.equalsIgnoreCase(label)) {
                return type;
            }
        }
        return null;
    }

    /** The type of a JWK as eSignet hands it over, or null when kty/crv name none of ours. */
    static WalletKeyType of(Map<String, Object> jwk) {
        Object kty = jwk.get("kty");
        Object crv = jwk.get("crv");
        if ("RSA".equals(kty)) {
            return RSA;
        }
        if ("EC".equals(kty) && "P-256".equals(crv)) {
            return EC_P256;
        }
        if ("EC".equals(kty) && "P-384".equals(crv)) {
            return EC_P384;
        }
        if ("OKP".equals(kty) && "Ed25519".equals(crv)) {
            return ED25519;
        }
        return null;
    }
}
